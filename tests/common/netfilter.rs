//! Real network partitions for the integration tests: iptables rules that drop the peer
//! traffic between one node's loopback address and the others', in both directions,
//! while the test client still reaches every node's API. Rules live in a chain of their
//! own, removed when the guard drops (also when the test panics).

use std::process::Command;

use super::Cluster;

/// A partition in force until dropped.
pub struct Partition {
    chain: String,
}

fn iptables(args: &[&str]) -> Result<(), String> {
    let out = Command::new("iptables")
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| format!("iptables: {e} (scripts/prereqs.sh installs it)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables {}: {} (the partition tests need root)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Partition {
    /// Cut `node` off from every other node of `c`: peer traffic (Raft, forwarding,
    /// gossip) is dropped both ways; API traffic from the test is not.
    pub fn isolate(c: &Cluster, node: u64) -> Partition {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let chain = format!(
            "orcht{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        iptables(&["-N", &chain]).unwrap_or_else(|e| panic!("{e}"));
        let p = Partition { chain };
        iptables(&["-I", "INPUT", "-j", &p.chain]).unwrap_or_else(|e| panic!("{e}"));
        let me = c.node(node);
        for other in c.nodes.iter().filter(|n| n.id != node) {
            for (src, dst, port) in [
                (&me.host, &other.host, other.peer_port),
                (&other.host, &me.host, me.peer_port),
            ] {
                let port = port.to_string();
                iptables(&[
                    "-A", &p.chain, "-s", src, "-d", dst, "-p", "tcp", "--dport", &port, "-j",
                    "DROP",
                ])
                .unwrap_or_else(|e| panic!("{e}"));
            }
        }
        p
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = iptables(&["-D", "INPUT", "-j", &self.chain]);
        let _ = iptables(&["-F", &self.chain]);
        let _ = iptables(&["-X", &self.chain]);
    }
}
