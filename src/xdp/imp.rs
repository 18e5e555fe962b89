//! The aya loader and the map writer (built only with the `xdp` feature).

use core::net::{IpAddr, SocketAddr};
use std::collections::HashMap;

use aya::maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuValues};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{Xdp, XdpFlags};
use aya::Ebpf;

use super::{ChannelKey, PathCounters, RetiredMeter, XdpError, XdpMode, XdpSettings};
use crate::route::Counters;
use crate::sys::xdp::wait_for_running_programs;
use crate::sys::xdp::{
    Meter, RelayedKey, ToClientKey, ToClientValue, ToPeerKey, ToPeerValue, FAMILY_V4, FAMILY_V6,
    PATH_ABORTED, PATH_PASS_FIB, PATH_PASS_NOT_IP_UDP, PATH_PASS_NO_ENTRY,
    PATH_PASS_RELAY_TO_RELAY, PATH_XDP_TO_CLIENT, PATH_XDP_TO_PEER,
};

/// The object file build.rs compiled from turnpike.bpf.c.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/turnpike.bpf.o"));

/// Slots in the `meters` map (its `max_entries`): at most this many relayed addresses at once.
const METER_SLOTS: u32 = 65536;

/// The loaded XDP program, attached to the configured interfaces through bpf_links this value owns.
/// Dropping it (or the process dying) detaches the program.
#[derive(Debug)]
pub struct FastPath {
    tables: XdpTables,
    // Owns the program and its links; dropped after `tables` (field order), which only closes map fds.
    ebpf: Ebpf,
    interfaces: Vec<String>,
    // The links still attached (empty after `detach_links`).
    links: Vec<XdpLinkId>,
}

impl FastPath {
    /// Loads and attaches the program as `settings` say. `Off` gives `Ok(None)`; `Auto` turns any
    /// failure into one warning line and `Ok(None)` (the userspace path carries everything).
    pub fn start(settings: &XdpSettings) -> Result<Option<FastPath>, XdpError> {
        let flags = match settings.mode {
            XdpMode::Off => return Ok(None),
            XdpMode::Auto => XdpFlags::default(),
            XdpMode::Native => XdpFlags::DRV_MODE,
            XdpMode::Generic => XdpFlags::SKB_MODE,
        };
        match Self::load(&settings.interfaces, flags) {
            Ok(f) => Ok(Some(f)),
            Err(e) if settings.mode == XdpMode::Auto => {
                tracing::warn!("xdp: {e}; relaying in userspace");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn load(interfaces: &[String], flags: XdpFlags) -> Result<FastPath, XdpError> {
        if interfaces.is_empty() {
            return Err(XdpError::Load(
                "no interfaces configured ([xdp] interfaces)".into(),
            ));
        }
        let mut ebpf = Ebpf::load(PROGRAM).map_err(|e| XdpError::Load(e.to_string()))?;
        let program: &mut Xdp = ebpf
            .program_mut("turnpike_xdp")
            .ok_or_else(|| XdpError::Load("the object has no turnpike_xdp program".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| XdpError::Load(e.to_string()))?;
        program.load().map_err(|e| XdpError::Load(e.to_string()))?;
        let mut links = Vec::with_capacity(interfaces.len());
        for interface in interfaces {
            // An error drops `ebpf`, which detaches the links made so far.
            links.push(attach(program, interface, flags)?);
        }
        let tables = XdpTables::new(&mut ebpf)?;
        Ok(FastPath {
            tables,
            ebpf,
            interfaces: interfaces.to_vec(),
            links,
        })
    }

    /// The maps, to program from route updates.
    pub fn tables(&mut self) -> &mut XdpTables {
        &mut self.tables
    }

    /// The maps, to read meters and counters.
    pub fn tables_ref(&self) -> &XdpTables {
        &self.tables
    }

    /// The interfaces the program is attached to.
    pub fn interfaces(&self) -> &[String] {
        &self.interfaces
    }

    /// Detaches from every interface (on drain) and keeps the maps, so that the meters can still be
    /// read: from now on every datagram takes the userspace path. Idempotent. Dropping the value
    /// detaches too (on exit).
    pub fn detach_links(&mut self) -> Result<(), XdpError> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut("turnpike_xdp")
            .ok_or_else(|| XdpError::Load("the object has no turnpike_xdp program".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| XdpError::Load(e.to_string()))?;
        let mut first_error = None;
        for (link, interface) in self.links.drain(..).zip(&self.interfaces) {
            if let Err(e) = program.detach(link) {
                first_error.get_or_insert(XdpError::Attach {
                    interface: interface.clone(),
                    detail: format!("detach: {}", error_chain(&e)),
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Attaches a program that passes everything to `interface`, for the far end of a veth pair that XDP
/// redirects or transmits into (a veth drops such frames unless its peer runs XDP or has GRO on).
/// Tests and the benchmark use it; the returned value owns the link.
pub fn attach_pass_program(interface: &str) -> Result<PassProgram, XdpError> {
    let mut ebpf = Ebpf::load(PROGRAM).map_err(|e| XdpError::Load(e.to_string()))?;
    let program: &mut Xdp = ebpf
        .program_mut("turnpike_pass")
        .ok_or_else(|| XdpError::Load("the object has no turnpike_pass program".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| XdpError::Load(e.to_string()))?;
    program.load().map_err(|e| XdpError::Load(e.to_string()))?;
    attach(program, interface, XdpFlags::default())?;
    Ok(PassProgram { _ebpf: ebpf })
}

/// An attached pass-everything program ([`attach_pass_program`]); dropping it detaches it.
#[derive(Debug)]
pub struct PassProgram {
    _ebpf: Ebpf,
}

fn attach(program: &mut Xdp, interface: &str, flags: XdpFlags) -> Result<XdpLinkId, XdpError> {
    let fail = |detail: String| XdpError::Attach {
        interface: interface.to_string(),
        detail,
    };
    // aya turns the name into a C string with an unwrap.
    if interface.is_empty() || interface.contains('\0') {
        return Err(fail("not an interface name".into()));
    }
    program
        .attach(interface, flags)
        .map_err(|e| fail(error_chain(&e)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The program's maps: the narrow seam through which route updates program the kernel cache.
///
/// Call [`add_relay`](Self::add_relay) when a relay socket opens, [`add_channel`](Self::add_channel)
/// after userspace has accepted a ChannelBind (its permission and peer policy already decided),
/// [`remove_channel`](Self::remove_channel) before or together with the userspace removal (expiry,
/// revocation), and [`remove_relay`](Self::remove_relay) when the allocation ends: it removes every
/// channel through that relayed address and retires its meter, whose final XDP counters
/// [`settle`](Self::settle) returns to fold into usage.
pub struct XdpTables {
    to_peer: BpfHashMap<MapData, ToPeerKey, ToPeerValue>,
    to_client: BpfHashMap<MapData, ToClientKey, ToClientValue>,
    relayed: BpfHashMap<MapData, RelayedKey, u8>,
    meters: PerCpuArray<MapData, Meter>,
    paths: PerCpuArray<MapData, u64>,
    relays: HashMap<SocketAddr, RelayEntry>,
    /// Removed relays whose entries are not all out of the maps yet, by meter slot.
    leftovers: HashMap<u32, Leftover>,
    free_slots: Vec<u32>,
    next_slot: u32,
    cpus: usize,
    /// Map deletions still to fail on purpose ([`fail_next_deletions`](Self::fail_next_deletions)).
    injected_failures: u32,
}

impl core::fmt::Debug for XdpTables {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XdpTables")
            .field("relays", &self.relays)
            .field("leftovers", &self.leftovers)
            .field("free_slots", &self.free_slots.len())
            .field("next_slot", &self.next_slot)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct RelayEntry {
    slot: u32,
    channels: Vec<(ChannelKey, SocketAddr)>,
}

/// What is left in the maps of a removed relay after a map deletion failed: its meter is neither
/// read nor its slot reused while a program run can still reach the slot. [`XdpTables::settle`]
/// retries the deletions.
#[derive(Debug)]
struct Leftover {
    relayed: SocketAddr,
    /// Channels whose entries may still be in `to_peer` or `to_client`.
    channels: Vec<(ChannelKey, SocketAddr)>,
    /// Its relay-to-relay mark may still be in `relayed`.
    mark: bool,
    /// Settles that found it still there.
    attempts: u32,
}

/// A removed relay whose entries still cannot be deleted after this many settles (about a second
/// at [`SETTLE_AFTER`](super::SETTLE_AFTER) apart) has its meter read anyway, so that its
/// allocation's usage record is not held forever; the slot is then never reused. What the stale
/// entries forward after that reading goes unbilled until the program is detached, and every failed
/// deletion was logged and counted.
const SETTLE_ATTEMPTS: u32 = 20;

impl XdpTables {
    fn new(ebpf: &mut Ebpf) -> Result<XdpTables, XdpError> {
        fn take(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, XdpError> {
            ebpf.take_map(name)
                .ok_or_else(|| XdpError::Load(format!("the object has no map {name}")))
        }
        let load = |e: MapError| XdpError::Load(e.to_string());
        let cpus =
            aya::util::nr_cpus().map_err(|(what, e)| XdpError::Load(format!("{what}: {e}")))?;
        Ok(XdpTables {
            to_peer: BpfHashMap::try_from(take(ebpf, "to_peer")?).map_err(load)?,
            to_client: BpfHashMap::try_from(take(ebpf, "to_client")?).map_err(load)?,
            relayed: BpfHashMap::try_from(take(ebpf, "relayed")?).map_err(load)?,
            meters: PerCpuArray::try_from(take(ebpf, "meters")?).map_err(load)?,
            paths: PerCpuArray::try_from(take(ebpf, "paths")?).map_err(load)?,
            relays: HashMap::new(),
            leftovers: HashMap::new(),
            free_slots: Vec::new(),
            next_slot: 0,
            cpus,
            injected_failures: 0,
        })
    }

    /// A relay socket of this host now serves an allocation at `relayed`: peers at this exact address
    /// are relay-to-relay traffic, which the program leaves to userspace. Idempotent.
    pub fn add_relay(&mut self, relayed: SocketAddr) -> Result<(), XdpError> {
        let relayed = canonical(relayed);
        if self.relays.contains_key(&relayed) {
            return Ok(());
        }
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None if self.next_slot < METER_SLOTS => {
                self.next_slot += 1;
                self.next_slot - 1
            }
            None => return Err(XdpError::Map("all meter slots are in use".into())),
        };
        if let Err(e) = self.zero_meter(slot) {
            self.free_slots.push(slot);
            return Err(e);
        }
        if let Err(e) = self.relayed.insert(relayed_key(relayed), 1, 0) {
            self.free_slots.push(slot);
            return Err(map_error(e));
        }
        self.relays.insert(
            relayed,
            RelayEntry {
                slot,
                channels: Vec::new(),
            },
        );
        Ok(())
    }

    /// Caches the channel `key` bound to `peer` through `relayed` (added before with
    /// [`add_relay`](Self::add_relay)), in both directions. Returns `Ok(false)`, caching nothing, when
    /// the addresses are not all of one family: such channels stay on the userspace path.
    pub fn add_channel(
        &mut self,
        key: ChannelKey,
        relayed: SocketAddr,
        peer: SocketAddr,
    ) -> Result<bool, XdpError> {
        let key = ChannelKey {
            client: canonical(key.client),
            listener: canonical(key.listener),
            channel: key.channel,
        };
        let (relayed, peer) = (canonical(relayed), canonical(peer));
        let fam = family(relayed.ip());
        if [key.client, key.listener, peer]
            .iter()
            .any(|a| family(a.ip()) != fam)
        {
            return Ok(false);
        }
        let Some(entry) = self.relays.get_mut(&relayed) else {
            return Err(XdpError::Map(format!(
                "relayed address {relayed} was not added"
            )));
        };
        let (pk, pv, ck, cv) = entries(key, relayed, peer, entry.slot);
        self.to_peer.insert(pk, pv, 0).map_err(map_error)?;
        if let Err(e) = self.to_client.insert(ck, cv, 0) {
            let _ = self.to_peer.remove(&pk);
            return Err(map_error(e));
        }
        if !entry.channels.contains(&(key, peer)) {
            entry.channels.push((key, peer));
        }
        Ok(true)
    }

    /// Removes the channel from the kernel cache (both directions); the next datagrams go to userspace.
    /// Absent entries are not an error.
    pub fn remove_channel(
        &mut self,
        key: ChannelKey,
        relayed: SocketAddr,
        peer: SocketAddr,
    ) -> Result<(), XdpError> {
        let key = ChannelKey {
            client: canonical(key.client),
            listener: canonical(key.listener),
            channel: key.channel,
        };
        let (relayed, peer) = (canonical(relayed), canonical(peer));
        let slot = self.relays.get(&relayed).map_or(0, |e| e.slot);
        let (pk, _, ck, _) = entries(key, relayed, peer, slot);
        absent_ok(self.to_peer.remove(&pk))?;
        absent_ok(self.to_client.remove(&ck))?;
        // Forgotten only once gone, so that `remove_relay` still removes what failed here.
        if let Some(entry) = self.relays.get_mut(&relayed) {
            entry.channels.retain(|c| *c != (key, peer));
        }
        Ok(())
    }

    /// The allocation at `relayed` ended: removes every channel through it and its relay-to-relay
    /// mark, and retires its meter slot. The slot is not read here: a program run on another CPU that
    /// looked a channel up before the removal may still add its datagram to it. Hand the slot to
    /// [`settle`](Self::settle) for what XDP forwarded since [`add_relay`](Self::add_relay); until
    /// then it is not reused. `None` for an address never added.
    ///
    /// The meter is retired even when a map deletion fails (the `Err`, to log and count): what is
    /// left in the maps stays on record, and `settle` deletes it before it reads the meter, so the
    /// datagrams those entries still forward meanwhile are billed too.
    pub fn remove_relay(
        &mut self,
        relayed: SocketAddr,
    ) -> Option<(RetiredMeter, Result<(), XdpError>)> {
        let relayed = canonical(relayed);
        let entry = self.relays.remove(&relayed)?;
        let mut left = Leftover {
            relayed,
            channels: entry.channels,
            mark: true,
            attempts: 0,
        };
        let result = self.delete(&mut left, entry.slot);
        if result.is_err() {
            self.leftovers.insert(entry.slot, left);
        }
        Some((RetiredMeter(entry.slot), result))
    }

    /// Deletes what `left` still has in the maps, forgetting each entry once it is gone. An entry is
    /// deleted only while it still points at `slot` (a later relay at the same address, or a later
    /// allocation of the same client, may have replaced it), and the mark only while no live relay
    /// has the address.
    fn delete(&mut self, left: &mut Leftover, slot: u32) -> Result<(), XdpError> {
        while let Some(&(key, peer)) = left.channels.last() {
            let (pk, _, ck, _) = entries(key, left.relayed, peer, slot);
            if ours(self.to_peer.get(&pk, 0).map(|v| v.slot), slot)? {
                self.injected()?;
                absent_ok(self.to_peer.remove(&pk))?;
            }
            if ours(self.to_client.get(&ck, 0).map(|v| v.slot), slot)? {
                self.injected()?;
                absent_ok(self.to_client.remove(&ck))?;
            }
            left.channels.pop();
        }
        if left.mark && !self.relays.contains_key(&left.relayed) {
            self.injected()?;
            absent_ok(self.relayed.remove(&relayed_key(left.relayed)))?;
        }
        left.mark = false;
        Ok(())
    }

    /// Makes the next `count` map deletions fail, as a kernel refusing them would: the seam through
    /// which the tests drive [`remove_relay`](Self::remove_relay)'s recovery. Nothing else calls it.
    #[doc(hidden)]
    pub fn fail_next_deletions(&mut self, count: u32) {
        self.injected_failures = count;
    }

    fn injected(&mut self) -> Result<(), XdpError> {
        if self.injected_failures == 0 {
            return Ok(());
        }
        self.injected_failures -= 1;
        Err(XdpError::Map("injected deletion failure".into()))
    }

    /// The final readings of `retired` meters (from [`remove_relay`](Self::remove_relay)), in order;
    /// their slots are free again afterwards (a slot that cannot be read is not reused). `None` for a
    /// meter whose relay still has entries in the maps (deleting them failed again, and they were
    /// tried fewer than [`SETTLE_ATTEMPTS`] times): settle it again later. `last` reads such a meter
    /// anyway (the process is stopping), as the last attempt does.
    ///
    /// Exact: a program run reaches a meter slot only through a `to_peer` or `to_client` value it
    /// looked up in the same run, and every such entry of these slots is deleted before they are
    /// read. The runs that looked one up before the deletion all return within one RCU grace period,
    /// which [`wait_for_running_programs`] waits out (once for the whole batch) before anything is
    /// read: no datagram can be added to a slot after its reading, nor to the next relay that gets
    /// the slot. Where the kernel refuses to wait (`nohz_full`), the caller's delay since the removal
    /// (the mirror's [`SETTLE_AFTER`](super::SETTLE_AFTER), far beyond a program run) is what is left.
    pub fn settle(
        &mut self,
        retired: &[RetiredMeter],
        last: bool,
    ) -> Vec<Option<Result<Counters, XdpError>>> {
        if retired.is_empty() {
            return Vec::new();
        }
        // Retried before the wait, which then covers the runs that looked up what this deletes.
        let mut abandoned = Vec::new();
        for &RetiredMeter(slot) in retired {
            let Some(mut left) = self.leftovers.remove(&slot) else {
                continue;
            };
            if let Err(e) = self.delete(&mut left, slot) {
                left.attempts += 1;
                if last || left.attempts >= SETTLE_ATTEMPTS {
                    tracing::error!(
                        relayed = %left.relayed,
                        "xdp: entries of a removed relay cannot be deleted ({e}); its meter is read \
                         now and what they forward until the program is detached goes unbilled"
                    );
                    abandoned.push(slot);
                } else {
                    tracing::warn!(relayed = %left.relayed, "xdp: removing a relay's entries: {e}; retrying");
                    self.leftovers.insert(slot, left);
                }
            }
        }
        if retired.iter().any(|m| !self.leftovers.contains_key(&m.0)) {
            if let Err(e) = wait_for_running_programs() {
                tracing::warn!("xdp: cannot wait for running programs (membarrier: {e}); reading the meters of removed relays after a delay only");
            }
        }
        retired
            .iter()
            .map(|&RetiredMeter(slot)| {
                if self.leftovers.contains_key(&slot) {
                    return None;
                }
                let reading = self.read_meter(slot);
                // `add_relay` zeroes it before its next relay; an abandoned slot may still be reached
                // by its stale entries.
                if reading.is_ok() && !abandoned.contains(&slot) {
                    self.free_slots.push(slot);
                }
                Some(reading)
            })
            .collect()
    }

    /// What XDP has forwarded for the allocation at `relayed` (summed over CPUs; zero if unknown).
    pub fn counters(&self, relayed: SocketAddr) -> Result<Counters, XdpError> {
        match self.relays.get(&canonical(relayed)) {
            Some(entry) => self.read_meter(entry.slot),
            None => Ok(Counters::default()),
        }
    }

    /// Packets per path, summed over CPUs.
    pub fn paths(&self) -> Result<PathCounters, XdpError> {
        let read = |index: u32| -> Result<u64, XdpError> {
            let values = self.paths.get(&index, 0).map_err(map_error)?;
            Ok(values.iter().sum())
        };
        Ok(PathCounters {
            xdp_to_peer: read(PATH_XDP_TO_PEER)?,
            xdp_to_client: read(PATH_XDP_TO_CLIENT)?,
            pass_not_ip_udp: read(PATH_PASS_NOT_IP_UDP)?,
            pass_no_entry: read(PATH_PASS_NO_ENTRY)?,
            pass_relay_to_relay: read(PATH_PASS_RELAY_TO_RELAY)?,
            pass_fib: read(PATH_PASS_FIB)?,
            aborted: read(PATH_ABORTED)?,
        })
    }

    fn read_meter(&self, slot: u32) -> Result<Counters, XdpError> {
        let values = self.meters.get(&slot, 0).map_err(map_error)?;
        Ok(values.iter().fold(Counters::default(), |mut c, m| {
            c.to_peer_bytes += m.to_peer_bytes;
            c.to_peer_packets += m.to_peer_packets;
            c.to_client_bytes += m.to_client_bytes;
            c.to_client_packets += m.to_client_packets;
            c
        }))
    }

    fn zero_meter(&mut self, slot: u32) -> Result<(), XdpError> {
        let zero = PerCpuValues::try_from(vec![Meter::default(); self.cpus])
            .map_err(|e| XdpError::Map(e.to_string()))?;
        self.meters.set(slot, zero, 0).map_err(map_error)
    }
}

fn map_error(e: MapError) -> XdpError {
    XdpError::Map(error_chain(&e))
}

/// Whether a map entry (its meter slot, as looked up) still belongs to `slot`; an absent one does not.
fn ours(looked_up: Result<u32, MapError>, slot: u32) -> Result<bool, XdpError> {
    match looked_up {
        Ok(s) => Ok(s == slot),
        Err(e) => absent_ok(Err(e)).map(|()| false),
    }
}

fn absent_ok(r: Result<(), MapError>) -> Result<(), XdpError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        Err(e) => Err(map_error(e)),
    }
}

/// IPv4-mapped IPv6 addresses are IPv4 on the wire.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn family(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => FAMILY_V4,
        IpAddr::V6(_) => FAMILY_V6,
    }
}

fn ip_bytes(ip: IpAddr) -> [u8; 16] {
    let mut b = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => b[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => b = v6.octets(),
    }
    b
}

fn relayed_key(relayed: SocketAddr) -> RelayedKey {
    RelayedKey {
        ip: ip_bytes(relayed.ip()),
        port: relayed.port().to_be_bytes(),
        family: family(relayed.ip()),
        pad: 0,
    }
}

fn entries(
    key: ChannelKey,
    relayed: SocketAddr,
    peer: SocketAddr,
    slot: u32,
) -> (ToPeerKey, ToPeerValue, ToClientKey, ToClientValue) {
    let fam = family(relayed.ip());
    let channel = key.channel.to_be_bytes();
    (
        ToPeerKey {
            client_ip: ip_bytes(key.client.ip()),
            listener_ip: ip_bytes(key.listener.ip()),
            client_port: key.client.port().to_be_bytes(),
            listener_port: key.listener.port().to_be_bytes(),
            channel,
            family: fam,
            pad: 0,
        },
        ToPeerValue {
            relayed_ip: ip_bytes(relayed.ip()),
            peer_ip: ip_bytes(peer.ip()),
            relayed_port: relayed.port().to_be_bytes(),
            peer_port: peer.port().to_be_bytes(),
            slot,
        },
        ToClientKey {
            relayed_ip: ip_bytes(relayed.ip()),
            peer_ip: ip_bytes(peer.ip()),
            relayed_port: relayed.port().to_be_bytes(),
            peer_port: peer.port().to_be_bytes(),
            family: fam,
            pad: [0; 3],
        },
        ToClientValue {
            listener_ip: ip_bytes(key.listener.ip()),
            client_ip: ip_bytes(key.client.ip()),
            listener_port: key.listener.port().to_be_bytes(),
            client_port: key.client.port().to_be_bytes(),
            channel,
            pad: 0,
            slot,
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_in_network_order_and_mapped_addresses_are_ipv4() {
        let key = ChannelKey {
            client: canonical("[::ffff:198.18.0.2]:40000".parse().unwrap()),
            listener: "198.18.0.1:3478".parse().unwrap(),
            channel: 0x4001,
        };
        let (pk, pv, ck, cv) = entries(
            key,
            "198.19.0.1:50000".parse().unwrap(),
            "198.19.0.2:7".parse().unwrap(),
            9,
        );
        assert_eq!(&pk.client_ip[..4], &[198, 18, 0, 2]);
        assert_eq!(&pk.client_ip[4..], &[0; 12]);
        assert_eq!(pk.family, FAMILY_V4);
        assert_eq!(pk.client_port, [0x9c, 0x40]);
        assert_eq!(pk.channel, [0x40, 0x01]);
        assert_eq!(pv.relayed_port, [0xc3, 0x50]);
        assert_eq!(pv.slot, 9);
        assert_eq!(ck.peer_port, [0, 7]);
        assert_eq!(cv.listener_port, [0x0d, 0x96]);
    }
}
