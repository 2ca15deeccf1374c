//! The join probe: how a leader checks a would-be member before it sends it anything
//! that carries the cluster secret.
//!
//! Every other peer call carries the secret, so a leader that called an operator's
//! mistyped address the usual way handed the secret to whoever listens there. Instead
//! the leader sends a fresh random nonce to `/cluster/hello`, which needs no secret; the
//! node answers who it is and an HMAC-SHA256, under the cluster secret, of the nonce, its
//! node id and the peer address it was configured to advertise. Only a node that holds the
//! secret can answer; the leader checks the proof, and that the address in it is the one
//! the operator gave (so a listener cannot relay the nonce to a real, unjoined node
//! elsewhere and pass its answer off as its own), before it adds the node.
//!
//! The proof is domain-separated (a fixed prefix, NUL-separated fields), so answering
//! hellos signs nothing that any other check here accepts. Only a node that belongs to
//! no cluster answers with a proof (a member cannot be added anyway): the secret of a
//! running cluster is never exposed to offline guessing through this path, only a node's
//! while it waits to join, which is why the secret must be long and random.

use serde::{Deserialize, Serialize};

use super::types::NodeId;
use crate::executor::egress::hmac_sha256;

/// What the leader sends: a nonce it drew for this probe (hex, 32 bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelloRequest {
    pub nonce: String,
}

/// What a node answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub node_id: NodeId,
    /// The peer address this node advertises (its `peer_addr` setting).
    pub peer_addr: String,
    pub initialized: bool,
    pub protocol_supported: u32,
    /// HMAC-SHA256 (hex) of the nonce, `node_id` and `peer_addr` under the cluster secret.
    pub proof: String,
    /// The disk it holds ([`super::db::Db::disk_id`]; absent from older binaries). Not
    /// under the proof: it only has to tell this disk from another, and a node that
    /// lied about it would refuse the cluster's calls, not be trusted more.
    #[serde(default)]
    pub disk: Option<String>,
}

/// Longest nonce a node signs (hex characters).
pub const MAX_NONCE_LEN: usize = 128;

fn mac(secret: &str, nonce: &str, node_id: NodeId, peer_addr: &str) -> [u8; 32] {
    let msg = format!("orchestrator join probe v1\0{nonce}\0{node_id}\0{peer_addr}");
    hmac_sha256(secret.as_bytes(), msg.as_bytes())
}

/// A fresh nonce for one probe.
pub fn nonce() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The proof a node holding `secret` gives for `nonce`.
pub fn prove(secret: &str, nonce: &str, node_id: NodeId, peer_addr: &str) -> String {
    hex::encode(mac(secret, nonce, node_id, peer_addr))
}

/// Whether the address a node advertises is the one it was added at: equal as socket
/// addresses (so `[::1]:9090` and `[0:0:0:0:0:0:0:1]:9090` agree), or as text when
/// either is a host name. A node that advertises every address (`0.0.0.0`, `::`) names
/// none: accepting it by port would let a listener anywhere on that port pass off a
/// real node's proof as its own, so it never matches.
pub fn same_address(advertised: &str, given: &str) -> bool {
    match (
        advertised.parse::<std::net::SocketAddr>(),
        given.parse::<std::net::SocketAddr>(),
    ) {
        (Ok(a), Ok(_)) if a.ip().to_canonical().is_unspecified() => false,
        (Ok(a), Ok(b)) => a == b,
        _ => advertised == given,
    }
}

/// Whether `hello` answers `nonce` with a proof made with `secret` (constant time).
pub fn verify(secret: &str, nonce: &str, hello: &Hello) -> bool {
    let want = mac(secret, nonce, hello.node_id, &hello.peer_addr);
    let Ok(got) = hex::decode(&hello.proof) else {
        return false;
    };
    got.len() == want.len() && got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(secret: &str, nonce: &str) -> Hello {
        Hello {
            node_id: 4,
            peer_addr: "10.0.0.4:9090".into(),
            initialized: false,
            protocol_supported: 8,
            proof: prove(secret, nonce, 4, "10.0.0.4:9090"),
            disk: None,
        }
    }

    #[test]
    fn only_the_secret_answers_the_nonce_for_that_node_and_address() {
        let n = nonce();
        assert_eq!(n.len(), 64);
        assert_ne!(n, nonce(), "a new nonce per probe");
        assert!(verify("s3cret", &n, &hello("s3cret", &n)));
        // Another secret, another nonce (a replayed answer), a tampered proof.
        assert!(!verify("s3cret", &n, &hello("other", &n)));
        assert!(!verify("s3cret", &nonce(), &hello("s3cret", &n)));
        let mut h = hello("s3cret", &n);
        h.proof
            .replace_range(0..2, if &h.proof[0..2] == "00" { "01" } else { "00" });
        assert!(!verify("s3cret", &n, &h));
        h.proof = "not hex".into();
        assert!(!verify("s3cret", &n, &h));
        // The id and the address are under the proof: neither can be swapped.
        let mut h = hello("s3cret", &n);
        h.node_id = 5;
        assert!(!verify("s3cret", &n, &h));
        let mut h = hello("s3cret", &n);
        h.peer_addr = "10.0.0.66:9090".into();
        assert!(!verify("s3cret", &n, &h));
    }

    #[test]
    fn addresses_compare_as_socket_addresses() {
        assert!(same_address("[::1]:9090", "[0:0:0:0:0:0:0:1]:9090"));
        assert!(same_address("10.0.0.4:9090", "10.0.0.4:9090"));
        assert!(!same_address("10.0.0.4:9090", "10.0.0.4:9091"));
        assert!(!same_address("10.0.0.4:9090", "10.0.0.5:9090"));
        assert!(same_address("node4:9090", "node4:9090"));
        assert!(!same_address("node4:9090", "10.0.0.4:9090"));
        // A node that advertises every address names none.
        assert!(!same_address("0.0.0.0:9090", "10.0.0.4:9090"));
        assert!(!same_address("[::]:9090", "10.0.0.4:9090"));
        assert!(!same_address("0.0.0.0:9090", "0.0.0.0:9090"));
        assert!(!same_address("[::ffff:0.0.0.0]:9090", "10.0.0.4:9090"));
    }
}
