//! The few nf_tables requests a network lock makes while a connection is
//! frozen, spoken over netlink from this process (no `nft` run, which costs
//! milliseconds of process start and cache fetch): add set elements (lock
//! a direction, or lift it through the `pass` set), ask whether one is
//! still there (the lock holds), learn a table's handle, and delete a table
//! by handle.
//!
//! # Why an encoder of our own
//!
//! The messages are nfnetlink requests of the nf_tables subsystem
//! (`include/uapi/linux/netfilter/nf_tables.h`, Linux's stable UAPI):
//! `NFT_MSG_NEWSETELEM` and `NFT_MSG_DELTABLE` inside an
//! `NFNL_MSG_BATCH_BEGIN`/`END` pair (one transaction), and
//! `NFT_MSG_GETSETELEM` / `NFT_MSG_GETTABLE` on their own. The permissively
//! licensed netlink crates (`netlink-sys`, `netlink-packet-core`,
//! `netlink-packet-netfilter`, `neli`) have no nf_tables messages; the
//! crates that do are GPL (`rustables`) or bind the GPL libnftnl (`nftnl`).
//! What is needed here is a handful of fixed attributes, so this module
//! encodes them itself (a plain `AF_NETLINK` socket from `socket2`, no
//! `unsafe`), and is unit-tested against byte layouts written out by hand
//! from the UAPI header.
//!
//! # Keys
//!
//! A lock's sets are keyed `addr . inet_service . addr . inet_service`
//! (see [`crate::lock`]). nftables lays a concatenation out field by
//! field, each padded to 4 bytes, in network byte order: an IPv4 key is
//! 16 bytes (4 + 2 + 2 pad + 4 + 2 + 2 pad), an IPv6 key 40.

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// `NETLINK_NETFILTER`.
const NETLINK_NETFILTER: i32 = 12;
/// `NFNL_SUBSYS_NFTABLES`.
const SUBSYS_NFTABLES: u16 = 10;
/// `NFNL_MSG_BATCH_BEGIN` / `END` (`NLMSG_MIN_TYPE` and the next).
const MSG_BATCH_BEGIN: u16 = 0x10;
const MSG_BATCH_END: u16 = 0x11;
/// `enum nf_tables_msg_types`.
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
/// `NLMSG_ERROR`, `NLMSG_DONE`.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `nlmsghdr` flags.
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_CREATE: u16 = 0x400;
/// `NLA_F_NESTED`.
const NLA_F_NESTED: u16 = 0x8000;
/// `NFPROTO_INET`: the lock tables' family.
const NFPROTO_INET: u8 = 1;
/// `enum nft_table_attributes`.
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_HANDLE: u16 = 4;
/// `enum nft_set_elem_list_attributes`.
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
/// `enum nft_list_attributes`.
const NFTA_LIST_ELEM: u16 = 1;
/// `enum nft_set_elem_attributes`.
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
/// `enum nft_data_attributes`.
const NFTA_DATA_VALUE: u16 = 1;

/// `sizeof(struct nlmsghdr)` and `sizeof(struct nfgenmsg)`.
const NLMSG_HDR: usize = 16;
const NFGENMSG: usize = 4;

/// How long a reply may take before the request counts as failed.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A set's key for the packets `src -> dst` (see the module docs).
pub(crate) fn key(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut k = Vec::with_capacity(40);
    for a in [src, dst] {
        match a.ip() {
            IpAddr::V4(v4) => k.extend_from_slice(&v4.octets()),
            IpAddr::V6(v6) => k.extend_from_slice(&v6.octets()),
        }
        k.extend_from_slice(&a.port().to_be_bytes());
        k.extend_from_slice(&[0, 0]);
    }
    k
}

/// A request to nf_tables: one message, or (for changes) several in one
/// batch, applied as one transaction.
#[derive(Debug, Default)]
struct Request {
    buf: Vec<u8>,
    /// Sequence numbers of the messages that ask for a reply.
    acked: Vec<u32>,
    seq: u32,
}

impl Request {
    /// Starts a message; returns where its header is (for [`Request::end`]).
    fn begin(&mut self, ty: u16, flags: u16, family: u8, res_id: u16) -> usize {
        let at = self.buf.len();
        self.seq += 1;
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // length, later
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: kernel
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        if flags & NLM_F_ACK != 0 {
            self.acked.push(self.seq);
        }
        at
    }

    /// Ends the message begun at `at`.
    fn end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u32;
        self.buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// An nf_tables message (type `msg` of the subsystem).
    fn nft(&mut self, msg: u16, flags: u16) -> usize {
        self.begin(
            SUBSYS_NFTABLES << 8 | msg,
            NLM_F_REQUEST | flags,
            NFPROTO_INET,
            0,
        )
    }

    /// A whole batch marker message.
    fn batch(&mut self, ty: u16) {
        let at = self.begin(ty, NLM_F_REQUEST, 0, SUBSYS_NFTABLES);
        self.end(at);
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    /// A string attribute, NUL-terminated.
    fn attr_str(&mut self, ty: u16, s: &str) {
        let mut data = s.as_bytes().to_vec();
        data.push(0);
        self.attr(ty, &data);
    }

    /// Starts a nested attribute; returns where it is (for [`Request::nest_end`]).
    fn nest(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn nest_end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    /// The set-element list of `set` in `table`, with `elems` (a key and
    /// maybe a timeout each).
    fn elements(&mut self, table: &str, set: &str, elems: &[(Vec<u8>, Option<Duration>)]) {
        self.attr_str(NFTA_SET_ELEM_LIST_TABLE, table);
        self.attr_str(NFTA_SET_ELEM_LIST_SET, set);
        let list = self.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
        for (k, timeout) in elems {
            let elem = self.nest(NFTA_LIST_ELEM);
            let key = self.nest(NFTA_SET_ELEM_KEY);
            self.attr(NFTA_DATA_VALUE, k);
            self.nest_end(key);
            if let Some(t) = timeout {
                let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
                self.attr(NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
            }
            self.nest_end(elem);
        }
        self.nest_end(list);
    }
}

/// One change to make in a batch.
#[derive(Debug)]
pub(crate) enum Change<'a> {
    /// Add elements to a set (elements already there are no error).
    AddElements {
        /// The set.
        set: &'a str,
        /// Keys, each with a timeout.
        elems: Vec<(Vec<u8>, Option<Duration>)>,
    },
}

/// The batch that makes `changes` in the `inet` table `table`, as one
/// transaction.
fn batch(table: &str, changes: &[Change<'_>]) -> Request {
    let mut r = Request::default();
    r.batch(MSG_BATCH_BEGIN);
    for c in changes {
        match c {
            Change::AddElements { set, elems } => {
                let at = r.nft(NFT_MSG_NEWSETELEM, NLM_F_CREATE | NLM_F_ACK);
                r.elements(table, set, elems);
                r.end(at);
            }
        }
    }
    r.batch(MSG_BATCH_END);
    r
}

/// Which table to delete.
#[derive(Debug, Clone, Copy)]
enum TableRef<'a> {
    Handle(u64),
    Name(&'a str),
}

/// The batch that deletes an `inet` table.
fn delete_table_request(which: TableRef<'_>) -> Request {
    let mut r = Request::default();
    r.batch(MSG_BATCH_BEGIN);
    let at = r.nft(NFT_MSG_DELTABLE, NLM_F_ACK);
    match which {
        TableRef::Handle(h) => r.attr(NFTA_TABLE_HANDLE, &h.to_be_bytes()),
        TableRef::Name(name) => r.attr_str(NFTA_TABLE_NAME, name),
    }
    r.end(at);
    r.batch(MSG_BATCH_END);
    r
}

/// Makes `changes` in the `inet` table `table`, all or none. An error is
/// the kernel's (e.g. `ENOENT`: no such table or set).
pub(crate) fn apply(table: &str, changes: &[Change<'_>]) -> io::Result<()> {
    transact(&batch(table, changes)).map(drop)
}

/// Deletes the `inet` table with handle `handle` (`ENOENT`: none).
pub(crate) fn delete_table(handle: u64) -> io::Result<()> {
    transact(&delete_table_request(TableRef::Handle(handle))).map(drop)
}

/// Deletes the `inet` table named `name` (`ENOENT`: none).
pub(crate) fn delete_table_named(name: &str) -> io::Result<()> {
    transact(&delete_table_request(TableRef::Name(name))).map(drop)
}

/// Whether the element `key` is in `set` of the `inet` table `table` (and
/// not expired): `Ok(false)` if the element, the set or the table is not
/// there.
pub(crate) fn has_element(table: &str, set: &str, key: Vec<u8>) -> io::Result<bool> {
    let mut r = Request::default();
    let at = r.nft(NFT_MSG_GETSETELEM, NLM_F_ACK);
    r.elements(table, set, &[(key, None)]);
    r.end(at);
    match transact(&r) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The handle of the `inet` table `table`, `None` if there is none.
pub(crate) fn table_handle(table: &str) -> io::Result<Option<u64>> {
    let mut r = Request::default();
    let at = r.nft(NFT_MSG_GETTABLE, NLM_F_ACK);
    r.attr_str(NFTA_TABLE_NAME, table);
    r.end(at);
    match transact(&r) {
        Ok(replies) => Ok(replies.iter().find_map(|m| parse_table_handle(m))),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The handle in a `NFT_MSG_NEWTABLE` message (a reply to
/// `NFT_MSG_GETTABLE`), header included.
fn parse_table_handle(msg: &[u8]) -> Option<u64> {
    let ty = u16::from_ne_bytes(msg.get(4..6)?.try_into().ok()?);
    if ty != SUBSYS_NFTABLES << 8 | NFT_MSG_NEWTABLE {
        return None;
    }
    let mut attrs = msg.get(NLMSG_HDR + NFGENMSG..)?;
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]) & !NLA_F_NESTED;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if ty == NFTA_TABLE_HANDLE && len == 12 {
            return Some(u64::from_be_bytes(attrs[4..12].try_into().ok()?));
        }
        attrs = &attrs[((len + 3) & !3).min(attrs.len())..];
    }
    None
}

/// Sends `r` and reads until every message that asked for an
/// acknowledgement has one; returns the other replies (whole messages).
/// The first error the kernel reports is returned (the kernel applies a
/// batch with an error in it not at all).
fn transact(r: &Request) -> io::Result<Vec<Vec<u8>>> {
    let sock = Socket::new(
        Domain::from(libc::AF_NETLINK),
        Type::RAW,
        Some(Protocol::from(NETLINK_NETFILTER)),
    )?;
    sock.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let sent = sock.send(&r.buf)?;
    if sent != r.buf.len() {
        return Err(io::Error::other("netlink: short send"));
    }
    let mut pending = r.acked.clone();
    let mut replies = Vec::new();
    let mut first_error = None;
    let mut buf = vec![0u8; 64 << 10];
    while !pending.is_empty() {
        let n = (&sock).read(&mut buf).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(io::ErrorKind::TimedOut, "nf_tables did not answer")
            } else {
                e
            }
        })?;
        let mut rest = &buf[..n];
        while rest.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
            if len < NLMSG_HDR || len > rest.len() {
                return Err(io::Error::other("netlink: bad reply length"));
            }
            let msg = &rest[..len];
            let ty = u16::from_ne_bytes([msg[4], msg[5]]);
            let seq = u32::from_ne_bytes(msg[8..12].try_into().expect("4 bytes"));
            match ty {
                NLMSG_ERROR => {
                    let code = msg
                        .get(NLMSG_HDR..NLMSG_HDR + 4)
                        .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                        .ok_or_else(|| io::Error::other("netlink: short error"))?;
                    pending.retain(|&s| s != seq);
                    if code != 0 && first_error.is_none() {
                        first_error = Some(io::Error::from_raw_os_error(-code));
                    }
                }
                NLMSG_DONE => {}
                _ => replies.push(msg.to_vec()),
            }
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(replies),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }

    #[test]
    fn keys_are_padded_concatenations_in_network_order() {
        let k = key(
            "10.0.0.2:5000".parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
        );
        assert_eq!(k, [10, 0, 0, 2, 0x13, 0x88, 0, 0, 10, 0, 0, 1, 0, 80, 0, 0]);
        let k6 = key(
            "[::1]:1".parse().unwrap(),
            "[2001:db8::2]:2".parse().unwrap(),
        );
        assert_eq!(k6.len(), 40);
        assert_eq!(&k6[15..20], &[1, 0, 1, 0, 0]);
        assert_eq!(&k6[20..22], &[0x20, 0x01]);
        assert_eq!(&k6[36..40], &[0, 2, 0, 0]);
    }

    #[test]
    fn an_element_batch_is_laid_out_as_the_uapi_says() {
        let r = batch(
            "t",
            &[Change::AddElements {
                set: "in4",
                elems: vec![(vec![1; 16], Some(Duration::from_secs(2)))],
            }],
        );
        let mut want = Vec::new();
        // Batch begin: 20 bytes, AF_UNSPEC, res_id NFNL_SUBSYS_NFTABLES.
        want.extend_from_slice(&20u32.to_ne_bytes());
        want.extend_from_slice(&ne16(0x10));
        want.extend_from_slice(&ne16(NLM_F_REQUEST));
        want.extend_from_slice(&1u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[0, 0, 0, 10]);
        // NEWSETELEM.
        let body_len = 8 // table "t\0" padded
            + 8 // set "in4\0"
            + 4 + (4 + (4 + (4 + 16)) + (4 + 8)); // list > elem > key > value, timeout
        want.extend_from_slice(&((20 + body_len) as u32).to_ne_bytes());
        want.extend_from_slice(&ne16(10 << 8 | 12));
        want.extend_from_slice(&ne16(NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK));
        want.extend_from_slice(&2u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[1, 0, 0, 0]); // NFPROTO_INET
        want.extend_from_slice(&ne16(6));
        want.extend_from_slice(&ne16(1));
        want.extend_from_slice(b"t\0\0\0");
        want.extend_from_slice(&ne16(8));
        want.extend_from_slice(&ne16(2));
        want.extend_from_slice(b"in4\0");
        want.extend_from_slice(&ne16(44));
        want.extend_from_slice(&ne16(3 | 0x8000));
        want.extend_from_slice(&ne16(40));
        want.extend_from_slice(&ne16(1 | 0x8000));
        want.extend_from_slice(&ne16(24));
        want.extend_from_slice(&ne16(1 | 0x8000));
        want.extend_from_slice(&ne16(20));
        want.extend_from_slice(&ne16(1));
        want.extend_from_slice(&[1; 16]);
        want.extend_from_slice(&ne16(12));
        want.extend_from_slice(&ne16(4));
        want.extend_from_slice(&2000u64.to_be_bytes());
        // Batch end.
        want.extend_from_slice(&20u32.to_ne_bytes());
        want.extend_from_slice(&ne16(0x11));
        want.extend_from_slice(&ne16(NLM_F_REQUEST));
        want.extend_from_slice(&3u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[0, 0, 0, 10]);
        assert_eq!(r.buf, want);
        assert_eq!(r.acked, [2]);
    }

    #[test]
    fn a_table_deletion_names_the_handle() {
        let r = delete_table_request(TableRef::Handle(0x0102));
        let msg = &r.buf[20..r.buf.len() - 20];
        assert_eq!(msg.len(), 20 + 12);
        assert_eq!(&msg[4..6], &ne16(10 << 8 | 2));
        assert_eq!(&msg[20..22], &ne16(12));
        assert_eq!(&msg[22..24], &ne16(NFTA_TABLE_HANDLE));
        assert_eq!(&msg[24..32], &0x0102u64.to_be_bytes());
        let r = delete_table_request(TableRef::Name("abc"));
        let msg = &r.buf[20..r.buf.len() - 20];
        assert_eq!(&msg[20..22], &ne16(8));
        assert_eq!(&msg[22..24], &ne16(NFTA_TABLE_NAME));
        assert_eq!(&msg[24..28], b"abc\0");
    }

    #[test]
    fn a_table_reply_gives_its_handle() {
        let mut msg = Vec::new();
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&ne16(10 << 8));
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&[1, 0, 0, 0]);
        msg.extend_from_slice(&ne16(6));
        msg.extend_from_slice(&ne16(NFTA_TABLE_NAME));
        msg.extend_from_slice(b"t\0\0\0");
        msg.extend_from_slice(&ne16(12));
        msg.extend_from_slice(&ne16(NFTA_TABLE_HANDLE));
        msg.extend_from_slice(&42u64.to_be_bytes());
        assert_eq!(parse_table_handle(&msg), Some(42));
        assert_eq!(parse_table_handle(&msg[..30]), None);
        msg[4..6].copy_from_slice(&ne16(10 << 8 | 3));
        assert_eq!(parse_table_handle(&msg), None);
    }
}
