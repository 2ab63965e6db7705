//! QEMU's socket syntax for QMP monitors:
//!
//! * `-qmp unix:PATH,server=on,wait=off` (also the older `unix:PATH,server,nowait`),
//! * `-qmp tcp:[HOST]:PORT,server=on,wait=off`,
//! * `-chardev socket,id=ID,path=PATH,server=on,wait=off` (or `host=H,port=P`) together with
//!   `-mon chardev=ID,mode=control`.
//!
//! Options follow QemuOpts rules: `,,` is a literal comma, `key` alone means `key=on`, `nokey`
//! means `key=off`, and booleans accept `on/off/yes/no/true/false/y/n`. As in QEMU, `server`
//! without `wait=off`/`nowait` means wait: startup blocks until the first client connects.
//! enlighten only listens, so `server=on` is required.

use std::fmt;
use std::path::PathBuf;

/// A bad `-qmp`, `-chardev` or `-mon` value. The text is QEMU-style; the caller prefixes it
/// with the program name and the option, e.g. `enlighten: -qmp foo: ...`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(msg.into()))
}

/// Where a QMP server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketAddress {
    Unix(PathBuf),
    /// `host` is empty for "all addresses"; IPv6 hosts are stored without brackets.
    Tcp {
        host: String,
        port: u16,
    },
}

/// A QMP listening socket and whether startup waits for the first client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpEndpoint {
    pub address: SocketAddress,
    /// `wait=on`: block startup until a client connects (QEMU's default for `server`).
    pub wait: bool,
}

impl fmt::Display for QmpEndpoint {
    /// QEMU's description of a listening socket, e.g. `unix:/tmp/q.sock,server=on`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            SocketAddress::Unix(p) => write!(f, "unix:{},server=on", p.display()),
            SocketAddress::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port},server=on")
            }
            SocketAddress::Tcp { host, port } => write!(f, "tcp:{host}:{port},server=on"),
        }
    }
}

/// Splits a QemuOpts string on single commas; `,,` stands for a literal comma.
fn split_opts(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

fn parse_bool(key: &str, value: &str) -> Result<bool, SpecError> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// QemuOpts as (key, value) pairs; `implied` names the key of a leading bare value.
fn parse_opts(parts: &[String], bools: &[&str]) -> Result<Vec<(String, String)>, SpecError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in parts {
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                // Short-form booleans: `server` = `server=on`, `nowait` = `wait=off`.
                if bools.contains(&part.as_str()) {
                    (part.clone(), "on".to_string())
                } else if let Some(k) = part.strip_prefix("no").filter(|k| bools.contains(k)) {
                    (k.to_string(), "off".to_string())
                } else if part.is_empty() {
                    continue;
                } else {
                    return err(format!("Invalid parameter '{part}'"));
                }
            }
        };
        if let Some(slot) = out.iter_mut().find(|(k, _)| *k == key) {
            // QemuOpts: the last occurrence wins.
            slot.1 = value;
        } else {
            out.push((key, value));
        }
    }
    Ok(out)
}

/// `server` and `wait` from parsed options; refuses client mode.
fn server_wait(opts: &[(String, String)]) -> Result<bool, SpecError> {
    let get = |k: &str| {
        opts.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let server = match get("server") {
        Some(v) => parse_bool("server", v)?,
        None => false,
    };
    if !server {
        return err(
            "enlighten only listens for QMP clients: add 'server=on' (connecting out to a \
             client socket is not supported)",
        );
    }
    match get("wait") {
        Some(v) => parse_bool("wait", v),
        None => Ok(true),
    }
}

fn parse_port(s: &str, whole: &str) -> Result<u16, SpecError> {
    s.parse::<u16>()
        .map_err(|_| SpecError(format!("error parsing port in address '{whole}'")))
}

/// Parses `HOST:PORT`, `:PORT` or `[V6]:PORT`.
fn parse_inet(addr: &str) -> Result<(String, u16), SpecError> {
    if let Some(rest) = addr.strip_prefix('[') {
        let Some((host, tail)) = rest.split_once(']') else {
            return err(format!("error parsing IPv6 address '{addr}'"));
        };
        let Some(port) = tail.strip_prefix(':') else {
            return err(format!("error parsing IPv6 address '{addr}'"));
        };
        return Ok((host.to_string(), parse_port(port, addr)?));
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return err(format!("error parsing address '{addr}'"));
    };
    if host.contains(':') {
        return err(format!(
            "error parsing address '{addr}': put IPv6 hosts in brackets"
        ));
    }
    Ok((host.to_string(), parse_port(port, addr)?))
}

fn check_known(opts: &[(String, String)], known: &[&str]) -> Result<(), SpecError> {
    match opts.iter().find(|(k, _)| !known.contains(&k.as_str())) {
        Some((k, _)) => err(format!("Invalid parameter '{k}'")),
        None => Ok(()),
    }
}

impl QmpEndpoint {
    /// Parses the value of `-qmp`: `unix:PATH[,opts]` or `tcp:[HOST]:PORT[,opts]`.
    pub fn parse_qmp(spec: &str) -> Result<QmpEndpoint, SpecError> {
        let parts = split_opts(spec);
        let (first, rest) = match parts.split_first() {
            Some(x) => x,
            None => return err(format!("'{spec}' is not a valid char driver")),
        };
        let bools = ["server", "wait", "nodelay"];
        if let Some(path) = first.strip_prefix("unix:") {
            if path.is_empty() {
                return err("chardev: socket: no path given");
            }
            let opts = parse_opts(rest, &bools)?;
            check_known(&opts, &["server", "wait"])?;
            Ok(QmpEndpoint {
                address: SocketAddress::Unix(PathBuf::from(path)),
                wait: server_wait(&opts)?,
            })
        } else if let Some(addr) = first.strip_prefix("tcp:") {
            let (host, port) = parse_inet(addr)?;
            let opts = parse_opts(rest, &bools)?;
            check_known(&opts, &["server", "wait", "nodelay"])?;
            Ok(QmpEndpoint {
                address: SocketAddress::Tcp { host, port },
                wait: server_wait(&opts)?,
            })
        } else {
            let driver = first.split(':').next().unwrap_or(first);
            err(format!(
                "'{driver}' is not a valid char driver for a QMP monitor (use unix:PATH,server=on \
                 or tcp:HOST:PORT,server=on)"
            ))
        }
    }
}

/// A `-chardev socket,...` definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChardevSocket {
    pub id: String,
    pub endpoint: QmpEndpoint,
}

/// The `id=` of any `-chardev` value (whatever its backend), for matching `-mon chardev=ID`.
pub fn chardev_id(spec: &str) -> Option<String> {
    split_opts(spec)
        .into_iter()
        .skip(1)
        .find_map(|p| p.strip_prefix("id=").map(str::to_string))
}

/// Parses `-chardev socket,id=ID,path=PATH,server=on,wait=off` (or `host=H,port=P` instead of
/// `path`).
pub fn parse_chardev(spec: &str) -> Result<ChardevSocket, SpecError> {
    let parts = split_opts(spec);
    let (backend, rest) = match parts.split_first() {
        Some(x) => x,
        None => return err("chardev: no backend given"),
    };
    if backend.contains('=') {
        return err("Parameter 'backend' is missing");
    }
    if backend != "socket" {
        return err(format!(
            "'{backend}' is not a valid char driver for a QMP monitor (use 'socket')"
        ));
    }
    let opts = parse_opts(rest, &["server", "wait", "nodelay"])?;
    check_known(
        &opts,
        &["id", "path", "host", "port", "server", "wait", "nodelay"],
    )?;
    let get = |k: &str| {
        opts.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let Some(id) = get("id").filter(|s| !s.is_empty()) else {
        return err("Parameter 'id' is missing");
    };
    let address = match (get("path"), get("host"), get("port")) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return err("chardev: socket: 'path' and 'host'/'port' are mutually exclusive")
        }
        (Some(""), None, None) => return err("chardev: socket: no path given"),
        (Some(path), None, None) => SocketAddress::Unix(PathBuf::from(path)),
        (None, _, None) => return err("chardev: socket: no port given"),
        (None, host, Some(port)) => SocketAddress::Tcp {
            host: host
                .unwrap_or("")
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: parse_port(port, port)?,
        },
    };
    Ok(ChardevSocket {
        id: id.to_string(),
        endpoint: QmpEndpoint {
            address,
            wait: server_wait(&opts)?,
        },
    })
}

/// `-mon mode=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonitorMode {
    /// QMP.
    Control,
    /// HMP (QEMU's default for `-mon`); enlighten does not implement it.
    Readline,
}

/// A parsed `-mon` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonitorSpec {
    pub chardev: String,
    pub mode: MonitorMode,
    pub pretty: bool,
}

/// Parses `-mon [chardev=]ID[,mode=control|readline][,pretty=on|off]`.
pub fn parse_mon(spec: &str) -> Result<MonitorSpec, SpecError> {
    let mut parts = split_opts(spec);
    if let Some(first) = parts.first_mut() {
        if !first.contains('=') {
            *first = format!("chardev={first}");
        }
    }
    let opts = parse_opts(&parts, &["pretty"])?;
    check_known(&opts, &["chardev", "mode", "pretty"])?;
    let get = |k: &str| {
        opts.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    let Some(chardev) = get("chardev").filter(|s| !s.is_empty()) else {
        return err("Parameter 'chardev' is missing");
    };
    let mode = match get("mode") {
        Some("control") => MonitorMode::Control,
        None | Some("readline") => MonitorMode::Readline,
        Some(other) => return err(format!("unknown monitor mode '{other}'")),
    };
    let pretty = match get("pretty") {
        Some(v) => parse_bool("pretty", v)?,
        None => false,
    };
    Ok(MonitorSpec {
        chardev: chardev.to_string(),
        mode,
        pretty,
    })
}

/// Resolves a `-mon` value against the `-chardev` values of the command line (in order; the
/// last definition of an id wins, as later ones are refused by QEMU anyway).
pub fn endpoint_for_monitor(
    mon_spec: &str,
    chardev_specs: &[String],
) -> Result<QmpEndpoint, SpecError> {
    let mon = parse_mon(mon_spec)?;
    if mon.mode != MonitorMode::Control {
        return err(
            "only QMP monitors are supported: add 'mode=control' (the human monitor, \
             mode=readline, is not implemented)",
        );
    }
    if mon.pretty {
        return err("pretty=on is not supported for QMP monitors");
    }
    let spec = chardev_specs
        .iter()
        .rev()
        .find(|s| chardev_id(s).as_deref() == Some(mon.chardev.as_str()))
        .ok_or_else(|| SpecError(format!("chardev \"{}\" not found", mon.chardev)))?;
    Ok(parse_chardev(spec)?.endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(p: &str, wait: bool) -> QmpEndpoint {
        QmpEndpoint {
            address: SocketAddress::Unix(PathBuf::from(p)),
            wait,
        }
    }

    fn tcp(h: &str, port: u16, wait: bool) -> QmpEndpoint {
        QmpEndpoint {
            address: SocketAddress::Tcp {
                host: h.to_string(),
                port,
            },
            wait,
        }
    }

    #[test]
    fn qmp_specs() {
        let ok = [
            (
                "unix:/tmp/q.sock,server=on,wait=off",
                unix("/tmp/q.sock", false),
            ),
            ("unix:/tmp/q.sock,server,nowait", unix("/tmp/q.sock", false)),
            ("unix:/tmp/q.sock,server", unix("/tmp/q.sock", true)),
            ("unix:/tmp/q.sock,server=on", unix("/tmp/q.sock", true)),
            (
                "unix:/tmp/q.sock,server=yes,wait=no",
                unix("/tmp/q.sock", false),
            ),
            (
                "unix:/tmp/q.sock,wait=off,server=on",
                unix("/tmp/q.sock", false),
            ),
            ("unix:/tmp/a,,b,server=on,wait=off", unix("/tmp/a,b", false)),
            (
                "tcp:127.0.0.1:4444,server=on,wait=off",
                tcp("127.0.0.1", 4444, false),
            ),
            ("tcp::4444,server,nowait", tcp("", 4444, false)),
            (
                "tcp:localhost:0,server=on,wait=off",
                tcp("localhost", 0, false),
            ),
            ("tcp:[::1]:4444,server=on,wait=off", tcp("::1", 4444, false)),
            (
                "tcp:127.0.0.1:4444,server=on,wait=off,nodelay=on",
                tcp("127.0.0.1", 4444, false),
            ),
        ];
        for (spec, expected) in ok {
            assert_eq!(QmpEndpoint::parse_qmp(spec), Ok(expected), "{spec}");
        }
        let bad = [
            ("stdio", "'stdio' is not a valid char driver"),
            ("foo:bar", "'foo' is not a valid char driver"),
            ("unix:/tmp/q.sock", "only listens"),
            ("unix:/tmp/q.sock,server=off", "only listens"),
            (
                "unix:/tmp/q.sock,server=maybe",
                "Parameter 'server' expects 'on' or 'off'",
            ),
            (
                "unix:/tmp/q.sock,server,wait=2",
                "Parameter 'wait' expects 'on' or 'off'",
            ),
            (
                "unix:/tmp/q.sock,server,bogus=1",
                "Invalid parameter 'bogus'",
            ),
            ("unix:/tmp/q.sock,server,bogus", "Invalid parameter 'bogus'"),
            ("unix:,server", "no path given"),
            ("tcp:4444,server", "error parsing address '4444'"),
            ("tcp:host:notaport,server", "error parsing port"),
            ("tcp:host:70000,server", "error parsing port"),
            ("tcp:[::1,server", "error parsing IPv6 address"),
            ("tcp:::1:4444,server", "brackets"),
        ];
        for (spec, text) in bad {
            let e = QmpEndpoint::parse_qmp(spec).unwrap_err();
            assert!(e.0.contains(text), "{spec}: {e}");
        }
    }

    #[test]
    fn chardev_and_mon() {
        let chardevs = vec![
            "stdio,id=ser0".to_string(),
            "socket,id=mon0,path=/tmp/m.sock,server=on,wait=off".to_string(),
            "socket,id=mon1,host=127.0.0.1,port=5555,server,nowait".to_string(),
            "socket,id=mon2,port=5556,server".to_string(),
        ];
        let ok = [
            ("chardev=mon0,mode=control", unix("/tmp/m.sock", false)),
            ("mon0,mode=control", unix("/tmp/m.sock", false)),
            (
                "chardev=mon1,mode=control,pretty=off",
                tcp("127.0.0.1", 5555, false),
            ),
            ("chardev=mon2,mode=control", tcp("", 5556, true)),
        ];
        for (mon, expected) in ok {
            assert_eq!(endpoint_for_monitor(mon, &chardevs), Ok(expected), "{mon}");
        }
        let bad = [
            ("chardev=nope,mode=control", "chardev \"nope\" not found"),
            ("chardev=mon0", "mode=control"),
            ("chardev=mon0,mode=readline", "mode=control"),
            ("chardev=mon0,mode=weird", "unknown monitor mode 'weird'"),
            (
                "chardev=mon0,mode=control,pretty=on",
                "pretty=on is not supported",
            ),
            (
                "chardev=ser0,mode=control",
                "'stdio' is not a valid char driver",
            ),
            ("mode=control", "Parameter 'chardev' is missing"),
            ("chardev=mon0,mode=control,x=1", "Invalid parameter 'x'"),
        ];
        for (mon, text) in bad {
            let e = endpoint_for_monitor(mon, &chardevs).unwrap_err();
            assert!(e.0.contains(text), "{mon}: {e}");
        }
        let bad_chardevs = [
            ("socket,path=/tmp/x,server=on", "Parameter 'id' is missing"),
            ("socket,id=a,server=on", "no port given"),
            (
                "socket,id=a,path=/x,host=h,port=1,server=on",
                "mutually exclusive",
            ),
            ("socket,id=a,path=/x", "only listens"),
            ("id=a,path=/x", "Parameter 'backend' is missing"),
            (
                "socket,id=a,path=/x,server,telnet=on",
                "Invalid parameter 'telnet'",
            ),
        ];
        for (spec, text) in bad_chardevs {
            let e = parse_chardev(spec).unwrap_err();
            assert!(e.0.contains(text), "{spec}: {e}");
        }
        assert_eq!(
            chardev_id("socket,id=x,,y,path=/p"),
            Some("x,y".to_string())
        );
        assert_eq!(chardev_id("stdio"), None);
    }

    #[test]
    fn display_matches_qemu_description() {
        assert_eq!(unix("/tmp/q", false).to_string(), "unix:/tmp/q,server=on");
        assert_eq!(tcp("::1", 4, true).to_string(), "tcp:[::1]:4,server=on");
        assert_eq!(tcp("h", 4, true).to_string(), "tcp:h:4,server=on");
    }
}
