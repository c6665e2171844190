//! The container command's environment and where to find its program.
//!
//! Both are computed before spawning, without system calls: the PATH search
//! becomes a list of candidate paths that the child tries with execve, as
//! execvp would, but without allocating between clone and exec.

/// PATH given to the command unless the kernel command line set one.
pub const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// HOME for the command (the kernel hands init HOME=/).
pub const HOME: &[u8] = b"/root";
/// TERM unless the kernel command line set one (`TERM=...` before `--`).
pub const DEFAULT_TERM: &[u8] = b"linux";

/// Builds the command's environment as `NAME=value` entries.
///
/// Starts from init's environment (HOME and TERM from the kernel, plus any
/// `NAME=value` words of the kernel command line it did not recognise), keeps
/// PATH and TERM if set there, and forces HOME.
pub fn environment<I>(inherited: I) -> Vec<Vec<u8>>
where
    I: IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
{
    let mut env: Vec<Vec<u8>> = Vec::new();
    let (mut have_path, mut have_term) = (false, false);
    for (name, value) in inherited {
        // No way to represent these in an envp entry; HOME is replaced below.
        if name.is_empty() || name.contains(&b'=') || name.contains(&0) || value.contains(&0) {
            continue;
        }
        match name.as_slice() {
            b"HOME" => continue,
            b"PATH" => have_path = true,
            b"TERM" => have_term = true,
            _ => {}
        }
        env.push([name.as_slice(), b"=", value.as_slice()].concat());
    }
    if !have_path {
        env.push([b"PATH=".as_slice(), DEFAULT_PATH].concat());
    }
    env.push([b"HOME=".as_slice(), HOME].concat());
    if !have_term {
        env.push([b"TERM=".as_slice(), DEFAULT_TERM].concat());
    }
    env
}

/// The value of PATH in an environment built by [`environment`].
pub fn path_of(env: &[Vec<u8>]) -> &[u8] {
    env.iter()
        .find_map(|e| e.strip_prefix(b"PATH=".as_slice()))
        .unwrap_or(DEFAULT_PATH)
}

/// The paths execvp would try for `program`, in order.
///
/// A name with a slash is used as is; otherwise each PATH entry is tried, an
/// empty entry meaning the current directory.
pub fn candidates(program: &[u8], path: &[u8]) -> Vec<Vec<u8>> {
    if program.contains(&b'/') {
        return vec![program.to_vec()];
    }
    path.split(|&b| b == b':')
        .map(|dir| {
            let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
            [dir, b"/", program].concat()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        v.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    fn strings(v: Vec<Vec<u8>>) -> Vec<String> {
        v.into_iter()
            .map(|e| String::from_utf8(e).unwrap())
            .collect()
    }

    #[test]
    fn kernel_environment_gets_defaults() {
        let env = environment(pairs(&[("HOME", "/"), ("TERM", "linux")]));
        assert_eq!(
            strings(env),
            [
                "TERM=linux",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/root"
            ]
        );
    }

    #[test]
    fn cmdline_term_path_and_extras_are_kept() {
        let env = environment(pairs(&[
            ("HOME", "/"),
            ("TERM", "xterm-256color"),
            ("PATH", "/opt/bin"),
            ("LANG", "C.UTF-8"),
        ]));
        assert_eq!(
            strings(env.clone()),
            [
                "TERM=xterm-256color",
                "PATH=/opt/bin",
                "LANG=C.UTF-8",
                "HOME=/root"
            ]
        );
        assert_eq!(path_of(&env), b"/opt/bin");
    }

    #[test]
    fn unrepresentable_entries_are_dropped() {
        let env = environment(vec![
            (b"A=B".to_vec(), b"x".to_vec()),
            (b"".to_vec(), b"x".to_vec()),
            (b"NUL".to_vec(), b"a\0b".to_vec()),
        ]);
        assert_eq!(strings(env).len(), 3); // only the defaults
    }

    #[test]
    fn candidates_follow_execvp() {
        assert_eq!(candidates(b"/bin/sh", b"/x:/y"), [b"/bin/sh".to_vec()]);
        assert_eq!(candidates(b"./run", b"/x"), [b"./run".to_vec()]);
        assert_eq!(
            strings(candidates(b"uname", b"/usr/bin::/bin")),
            ["/usr/bin/uname", "./uname", "/bin/uname"]
        );
        assert_eq!(strings(candidates(b"ls", DEFAULT_PATH)).len(), 6);
    }
}
