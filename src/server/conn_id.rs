//! Naming a connection across threads without naming its slot alone.

/// A connection's identity: its slab slot and the generation it was opened in.
///
/// Slots are reused as soon as a connection closes, so an answer (worker, resolver, spool
/// writer, timer) addressed to a slot alone could reach the wrong client. The generation makes
/// a late answer for a reused slot miss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ConnId(u64);

impl ConnId {
    pub(crate) fn new(slot: usize, generation: u32) -> Self {
        debug_assert!(u32::try_from(slot).is_ok(), "slots stay below 2^32");
        ConnId((u64::from(generation) << 32) | (slot as u64 & 0xffff_ffff))
    }

    /// The id as other threads carry it (DNS requests, spool jobs).
    pub(crate) fn from_raw(raw: u64) -> Self {
        ConnId(raw)
    }

    pub(crate) fn raw(self) -> u64 {
        self.0
    }

    pub(crate) fn slot(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }
}

/// The slot of connection `id`, unless it closed (and its slot may hold another by now).
pub(crate) fn live_slot<T>(
    slab: &slab::Slab<T>,
    id: ConnId,
    id_of: impl Fn(&T) -> ConnId,
) -> Option<usize> {
    match slab.get(id.slot()) {
        Some(entry) if id_of(entry) == id => Some(id.slot()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_ids_keep_slot_and_generation_apart() {
        let a = ConnId::new(7, 1);
        let b = ConnId::new(7, 2);
        assert_eq!(a.slot(), 7);
        assert_eq!(b.slot(), 7);
        assert_ne!(a, b);
        assert_eq!(ConnId::from_raw(a.raw()), a);
    }

    #[test]
    fn an_id_finds_its_slot_only_in_its_own_generation() {
        let mut slab = slab::Slab::new();
        let first = ConnId::new(slab.vacant_key(), 1);
        slab.insert(first);
        assert_eq!(live_slot(&slab, first, |id| *id), Some(first.slot()));
        slab.remove(first.slot());
        assert_eq!(live_slot(&slab, first, |id| *id), None, "closed");
        let second = ConnId::new(slab.vacant_key(), 2);
        slab.insert(second);
        assert_eq!(second.slot(), first.slot());
        assert_eq!(live_slot(&slab, first, |id| *id), None, "reused slot");
        assert_eq!(live_slot(&slab, second, |id| *id), Some(second.slot()));
    }
}
