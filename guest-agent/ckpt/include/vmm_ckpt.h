/*
 * vmm_ckpt.h: checkpoint the whole VM from inside it.
 *
 * Link with libvmm_ckpt.a (in the default guest: /usr/local/lib), e.g.
 *   cc -static prog.c -lvmm_ckpt
 * The calls talk to the guest agent (/run/vmm/agent.sock); the VMM must run
 * with --snapshot-dir DIR, where the images go (DIR/NAME.vmm).
 */
#ifndef VMM_CKPT_H
#define VMM_CKPT_H

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Checkpoints the VM into the VMM's snapshot directory under `name`
 * (letters, digits, '.', '_', '-'; NULL for a name with a timestamp).
 * Returns 0 in the original run once the image is durable on the host,
 * 1 when the program wakes up in a VM restored from that image, and -1
 * with errno set on failure (EPERM: the VMM has no --snapshot-dir;
 * EINVAL: a bad name; ENOENT: no agent in this guest; EIO: the snapshot
 * failed).
 */
int vmm_checkpoint(const char *name);

/*
 * Asks the agent to send this process `before_signal` before each
 * checkpoint and `after_signal` after each restore (0 for the defaults,
 * SIGUSR1 and SIGUSR2). Returns 0, or -1 with errno set.
 */
int vmm_notify_register(int before_signal, int after_signal);

/*
 * Tells the agent this process has done its before-checkpoint work; the
 * checkpoint waits (a bounded time) for every registered process to say so.
 * Returns 0, or -1 with errno set.
 */
int vmm_notify_ready(void);

#ifdef __cplusplus
}
#endif

#endif
