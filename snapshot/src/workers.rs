//! The crate's one pool of worker threads, used wherever chunks are
//! compressed or decompressed: the writer's encoder, the reader's apply
//! pipeline and [`crate::decode_parallel`].
//!
//! This thread hands out jobs (it reads them from a stream, or cuts them
//! from memory) while `threads` scoped workers run them, each keeping its
//! own context (a zstd context and buffers) from job to job. At most
//! `window` jobs are in flight, which bounds memory however large the
//! guest. [`for_each`] runs jobs in any order; [`map_in_order`] also hands
//! their results back to this thread in the jobs' order. The first error,
//! from any side, stops the lot and is returned; a worker that panics is
//! an error too. With one thread, everything runs on this one.
//!
//! Why scoped threads and not rayon: the jobs come from this thread while
//! the workers run, the workers borrow guest memory for the call only, and
//! each needs its own zstd context. A bounded queue, a result channel and a
//! small reorder buffer do exactly that, without a global pool or a
//! dependency.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

use crate::error::SnapshotError;

/// Worker threads for a caller's `threads` option: 0 means one per core.
pub(crate) fn threads_or_cores(n: usize) -> usize {
    match n {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Runs `work` on every job that `jobs` yields (until it yields `None`),
/// in any order, on `threads` workers with a context each from `init`.
/// `jobs` runs on this thread; at most `window` (at least `threads`) jobs
/// are handed out and not yet finished.
pub(crate) fn for_each<C: Send, J: Send>(
    threads: usize,
    window: usize,
    mut init: impl FnMut() -> Result<C, SnapshotError>,
    mut jobs: impl FnMut() -> Result<Option<J>, SnapshotError>,
    work: impl Fn(&mut C, J) -> Result<(), SnapshotError> + Sync,
) -> Result<(), SnapshotError> {
    if threads <= 1 {
        let mut ctx = init()?;
        while let Some(job) = jobs()? {
            work(&mut ctx, job)?;
        }
        return Ok(());
    }
    // Workers do not answer, except with an error: the queue's bound keeps
    // the window, and the first error stops this thread handing out more.
    let first_error = Mutex::new(None);
    let report = |_, r: Result<(), SnapshotError>, stop: &AtomicBool| {
        if let Err(e) = r {
            lock(&first_error).get_or_insert(e);
            stop.store(true, Ordering::Relaxed);
        }
    };
    let queue = window.max(threads) - threads;
    let handed_out = with_workers(threads, queue, init, work, report, |job_tx, stop| {
        while !stop.load(Ordering::Relaxed) {
            let Some(job) = jobs()? else { break };
            job_tx.send((0, job)).map_err(|_| stopped())?;
        }
        Ok(())
    });
    // A worker's error stopped this thread, so it came first.
    match first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => handed_out,
    }
}

/// Runs `work` on every job that `jobs` yields (until it yields `None`)
/// and hands each result to `done`, in the jobs' order.
///
/// As [`for_each`], and `done` runs on this thread too. At most `window`
/// jobs are handed out and not yet done, so at most that many results
/// wait for an earlier one.
pub(crate) fn map_in_order<C: Send, J: Send, O: Send>(
    threads: usize,
    window: usize,
    mut init: impl FnMut() -> Result<C, SnapshotError>,
    mut jobs: impl FnMut() -> Result<Option<J>, SnapshotError>,
    work: impl Fn(&mut C, J) -> Result<O, SnapshotError> + Sync,
    mut done: impl FnMut(O) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    if threads <= 1 {
        let mut ctx = init()?;
        while let Some(job) = jobs()? {
            done(work(&mut ctx, job)?)?;
        }
        return Ok(());
    }
    let window = window.max(threads);
    let (result_tx, result_rx) = mpsc::channel::<(usize, Result<O, SnapshotError>)>();
    let report = move |i, r, _: &AtomicBool| {
        // Fails only once this thread has stopped listening.
        let _ = result_tx.send((i, r));
    };
    with_workers(threads, window, init, work, report, |job_tx, _| {
        hand_out(window, &mut jobs, &mut done, job_tx, &result_rx)
    })
}

fn stopped() -> SnapshotError {
    SnapshotError::Usage("the worker threads stopped")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts `threads` workers, each with a context from `init`, taking jobs
/// from a queue of `queue` places, running `work` on them and passing the
/// outcome to `report` (with the stop flag); runs `main` on this thread
/// with the queue's sender and the flag, then stops the workers.
fn with_workers<C: Send, J: Send, O>(
    threads: usize,
    queue: usize,
    mut init: impl FnMut() -> Result<C, SnapshotError>,
    work: impl Fn(&mut C, J) -> Result<O, SnapshotError> + Sync,
    report: impl Fn(usize, Result<O, SnapshotError>, &AtomicBool) + Sync,
    main: impl FnOnce(&mpsc::SyncSender<(usize, J)>, &AtomicBool) -> Result<(), SnapshotError>,
) -> Result<(), SnapshotError> {
    let contexts = (0..threads)
        .map(|_| init())
        .collect::<Result<Vec<C>, _>>()?;
    let (job_tx, job_rx) = mpsc::sync_channel::<(usize, J)>(queue);
    let job_rx = Mutex::new(job_rx);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for mut ctx in contexts {
            let (job_rx, stop, work, report) = (&job_rx, &stop, &work, &report);
            s.spawn(move || loop {
                // The queue's lock is held for the take only: a guard in
                // a `while let` head would live through the job and let
                // one worker run at a time.
                let next = lock(job_rx).recv();
                let Ok((i, job)) = next else { break };
                // After an error, jobs still queued are taken and dropped,
                // so this thread is never stuck handing out.
                if stop.load(Ordering::Relaxed) {
                    continue;
                }
                // A panicking job must still answer, or this thread could
                // wait for its result forever.
                let r = catch_unwind(AssertUnwindSafe(|| work(&mut ctx, job)))
                    .unwrap_or(Err(SnapshotError::Usage("a worker thread panicked")));
                report(i, r, stop);
            });
        }
        let r = main(&job_tx, &stop);
        if r.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        // The workers finish what they hold, drop what is queued, and end.
        drop(job_tx);
        r
    })
}

/// This thread's side of [`map_in_order`]: keeps the window full and
/// passes the results on in order, topping the window up before each
/// `done` so that the workers never wait for this thread's writing.
fn hand_out<J, O>(
    window: usize,
    jobs: &mut impl FnMut() -> Result<Option<J>, SnapshotError>,
    done: &mut impl FnMut(O) -> Result<(), SnapshotError>,
    job_tx: &mpsc::SyncSender<(usize, J)>,
    result_rx: &mpsc::Receiver<(usize, Result<O, SnapshotError>)>,
) -> Result<(), SnapshotError> {
    // Jobs sent; results taken in order (the last of them may wait in
    // `next` for `done`); results that came before an earlier job's.
    let (mut sent, mut taken) = (0usize, 0usize);
    let mut next = None;
    let mut early = BTreeMap::new();
    let mut more = true;
    loop {
        while more && sent - taken < window {
            match jobs()? {
                Some(job) => {
                    job_tx.send((sent, job)).map_err(|_| stopped())?;
                    sent += 1;
                }
                None => more = false,
            }
        }
        if let Some(o) = next.take() {
            done(o)?;
        }
        if let Some(o) = early.remove(&taken) {
            next = Some(o);
            taken += 1;
            continue;
        }
        if taken == sent {
            return Ok(());
        }
        let (i, r) = result_rx.recv().map_err(|_| stopped())?;
        early.insert(i, r?);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Yields 0..n.
    fn up_to(n: usize) -> impl FnMut() -> Result<Option<usize>, SnapshotError> {
        let mut i = 0;
        move || {
            i += 1;
            Ok((i <= n).then_some(i - 1))
        }
    }

    #[test]
    fn results_come_back_in_order_from_contexts_of_their_own() {
        for threads in [0, 1, 2, 3, 8] {
            for window in [1, 2, 5, 100] {
                for n in [0, 1, 7, 200] {
                    let mut out = Vec::new();
                    let inits = AtomicUsize::new(0);
                    map_in_order(
                        threads,
                        window,
                        || {
                            inits.fetch_add(1, Ordering::Relaxed);
                            Ok(Vec::<usize>::new())
                        },
                        up_to(n),
                        |seen: &mut Vec<usize>, j| {
                            // A context is one worker's: its jobs ascend.
                            assert!(seen.last().is_none_or(|&l| l < j));
                            seen.push(j);
                            Ok(j * j)
                        },
                        |o| {
                            out.push(o);
                            Ok(())
                        },
                    )
                    .unwrap();
                    let want: Vec<usize> = (0..n).map(|i| i * i).collect();
                    assert_eq!(out, want, "{threads} {window} {n}");
                    assert_eq!(inits.into_inner(), threads.max(1));
                }
            }
        }
    }

    #[test]
    fn for_each_runs_every_job_once() {
        for threads in [1, 2, 5] {
            let sum = AtomicUsize::new(0);
            let count = AtomicUsize::new(0);
            for_each(
                threads,
                2,
                || Ok(()),
                up_to(1000),
                |_, j| {
                    sum.fetch_add(j, Ordering::Relaxed);
                    count.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(count.into_inner(), 1000);
            assert_eq!(sum.into_inner(), 999 * 1000 / 2);
        }
    }

    #[test]
    fn the_first_error_stops_the_rest() {
        for threads in [1, 3] {
            let started = AtomicUsize::new(0);
            let mut done = 0;
            let r = map_in_order(
                threads,
                4,
                || Ok(()),
                up_to(10_000),
                |_, j| {
                    started.fetch_add(1, Ordering::Relaxed);
                    match j {
                        5 => Err(SnapshotError::Usage("job 5")),
                        _ => Ok(()),
                    }
                },
                |()| {
                    done += 1;
                    Ok(())
                },
            );
            assert!(matches!(r, Err(SnapshotError::Usage("job 5"))), "{r:?}");
            assert!(done <= 5, "{done}");
            assert!(started.into_inner() < 100);
            let r = for_each(
                threads,
                4,
                || Ok(()),
                up_to(10_000),
                |_, j| match j {
                    5 => Err(SnapshotError::NoEnd),
                    _ => Ok(()),
                },
            );
            assert!(matches!(r, Err(SnapshotError::NoEnd)), "{r:?}");
        }
        let failing_jobs = || Err::<Option<()>, _>(SnapshotError::NoEnd);
        let r = for_each(2, 4, || Ok(()), failing_jobs, |_, ()| Ok(()));
        assert!(matches!(r, Err(SnapshotError::NoEnd)));
        let failing_init = || Err::<(), _>(SnapshotError::NoEnd);
        let r = for_each(2, 4, failing_init, || Ok(Some(())), |_, ()| Ok(()));
        assert!(matches!(r, Err(SnapshotError::NoEnd)));
        let r = map_in_order(
            2,
            4,
            || Ok(()),
            up_to(10),
            |_, _| Ok(()),
            |()| Err(SnapshotError::NoEnd),
        );
        assert!(matches!(r, Err(SnapshotError::NoEnd)));
    }

    #[test]
    fn a_panicking_job_is_an_error() {
        let r = for_each(
            2,
            4,
            || Ok(()),
            up_to(20),
            |_, j| {
                assert_ne!(j, 3, "a test panic in a worker");
                Ok(())
            },
        );
        assert!(matches!(r, Err(SnapshotError::Usage(_))), "{r:?}");
    }
}
