//! The image config's `User` (`name`, `uid`, `name:group`, `uid:gid`, ...)
//! resolved against the image's own /etc/passwd and /etc/group, as docker
//! (runc) resolves it: a name must exist there, a number need not; the
//! user's primary group unless one is given; as supplementary groups, that
//! group and (unless User names a group) the groups that list the user;
//! HOME from the user's entry.

/// Credentials and home of the container's process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    /// The primary group, then the others (setgroups).
    pub groups: Vec<u32>,
    /// The passwd entry's home directory, or `/` without one.
    pub home: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("the image's User {0:?} names no user in its /etc/passwd")]
    NoSuchUser(String),
    #[error("the image's User {0:?} names no group in its /etc/group")]
    NoSuchGroup(String),
    #[error("the image's User {0:?} is not NAME, UID, NAME:GROUP or UID:GID")]
    Malformed(String),
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 7).then_some(())?;
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// (name, gid, members) of each /etc/group line.
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4).then_some(())?;
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// Resolves `spec` (the config's `User`; empty means root).
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<User, UserError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    if group_part == Some("") || spec.matches(':').count() > 1 {
        return Err(UserError::Malformed(spec.into()));
    }
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|e| e.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|e| e.name == user_part)
                .ok_or_else(|| UserError::NoSuchUser(spec.into()))?,
        ),
    };
    let uid = match (&entry, user_part.parse::<u32>()) {
        (_, Ok(uid)) => uid,
        (Some(e), Err(_)) => e.uid,
        (None, Err(_)) => unreachable!("a name resolves to an entry or fails above"),
    };
    let gid = match group_part {
        None => entry.as_ref().map_or(0, |e| e.gid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|(name, _, _)| *name == g)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| UserError::NoSuchGroup(spec.into()))?,
        },
    };
    // The primary group first, as a login (initgroups) and docker have it;
    // with a group named in User, only that one (runc's rule).
    let mut groups = vec![gid];
    if let (Some(e), None) = (&entry, group_part) {
        for (_, g, members) in group_entries(group) {
            if members.contains(&e.name) && !groups.contains(&g) {
                groups.push(g);
            }
        }
    }
    let home = entry
        .as_ref()
        .map(|e| e.home)
        .filter(|h| !h.is_empty())
        .unwrap_or("/")
        .to_string();
    Ok(User {
        uid,
        gid,
        groups,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          app:x:1000:1001:App:/home/app:/bin/sh\n\
                          broken line\n\
                          nohome:x:1002:1002::::\n";
    const GROUP: &str = "root:x:0:\n\
                         apps:x:1001:\n\
                         audio:x:29:app,other\n\
                         video:x:44:app\n\
                         staff:x:50:other\n";

    fn user(uid: u32, gid: u32, groups: &[u32], home: &str) -> User {
        User {
            uid,
            gid,
            groups: groups.to_vec(),
            home: home.into(),
        }
    }

    #[test]
    fn names_numbers_and_groups() {
        let r = |s| resolve(s, PASSWD, GROUP);
        assert_eq!(r(""), Ok(user(0, 0, &[0], "/root")));
        assert_eq!(r("root"), Ok(user(0, 0, &[0], "/root")));
        assert_eq!(r("app"), Ok(user(1000, 1001, &[1001, 29, 44], "/home/app")));
        assert_eq!(
            r("1000"),
            Ok(user(1000, 1001, &[1001, 29, 44], "/home/app"))
        );
        assert_eq!(r("app:audio"), Ok(user(1000, 29, &[29], "/home/app")));
        assert_eq!(r("app:7"), Ok(user(1000, 7, &[7], "/home/app")));
        // A number needs no entry (docker runs it with gid 0 and HOME=/).
        assert_eq!(r("4242"), Ok(user(4242, 0, &[0], "/")));
        assert_eq!(r("4242:4243"), Ok(user(4242, 4243, &[4243], "/")));
        assert_eq!(r("nohome"), Ok(user(1002, 1002, &[1002], "/")));
    }

    #[test]
    fn unknown_names_and_bad_specs() {
        let r = |s| resolve(s, PASSWD, GROUP);
        assert_eq!(r("nobody"), Err(UserError::NoSuchUser("nobody".into())));
        assert_eq!(
            r("app:wheel"),
            Err(UserError::NoSuchGroup("app:wheel".into()))
        );
        assert_eq!(r("app:"), Err(UserError::Malformed("app:".into())));
        assert_eq!(r("a:b:c"), Err(UserError::Malformed("a:b:c".into())));
        assert_eq!(
            resolve("app", "", "").unwrap_err().to_string(),
            "the image's User \"app\" names no user in its /etc/passwd"
        );
    }
}
