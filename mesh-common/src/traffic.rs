//! TRAFFIC_COUNTERS: per-CPU array indexed by identity id, counting the bytes and packets the
//! workloads of that identity send and receive, as the kernel sees them at the cgroup.

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct TrafficCounters {
    /// Bytes at the network layer (IP header, transport header and payload) leaving the workload,
    /// as on the wire: a segmentation-offload super-packet counts the headers of every segment.
    pub sent_bytes: u64,
    /// Packets leaving the workload; a segmentation-offload super-packet counts its segments.
    pub sent_packets: u64,
    /// Bytes at the network layer delivered to the workload's sockets.
    pub received_bytes: u64,
    /// Packets delivered to the workload's sockets; a coalesced (GRO) packet counts its segments.
    pub received_packets: u64,
}

impl TrafficCounters {
    /// Sums per-CPU values (userspace reads one value per possible CPU).
    pub fn accumulate(&mut self, other: &TrafficCounters) {
        self.sent_bytes = self.sent_bytes.wrapping_add(other.sent_bytes);
        self.sent_packets = self.sent_packets.wrapping_add(other.sent_packets);
        self.received_bytes = self.received_bytes.wrapping_add(other.received_bytes);
        self.received_packets = self.received_packets.wrapping_add(other.received_packets);
    }
}

crate::user_pod!(TrafficCounters);

#[cfg(test)]
mod tests {
    use super::TrafficCounters;

    #[test]
    fn layout_has_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<TrafficCounters>(), 4 * 8);
        assert_eq!(core::mem::offset_of!(TrafficCounters, received_packets), 24);
    }

    #[test]
    fn accumulate_sums_every_field() {
        let one = TrafficCounters {
            sent_bytes: 1,
            sent_packets: 2,
            received_bytes: 3,
            received_packets: 4,
        };
        let mut total = TrafficCounters::default();
        total.accumulate(&one);
        total.accumulate(&one);
        assert_eq!(
            total,
            TrafficCounters {
                sent_bytes: 2,
                sent_packets: 4,
                received_bytes: 6,
                received_packets: 8,
            }
        );
    }
}
