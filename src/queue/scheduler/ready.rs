//! Deliveries waiting for a worker, in lanes: programs, handlers and
//! forwards share `[delivery] concurrency`; HTTP deliveries wait by host
//! (`scheme://host:port`), each host with at most `[http] max_per_host` in
//! flight. A host that answers slowly fills its own lane only: the others,
//! and the programs, go on.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

/// A delivery: the message's queue id and the delivery's index.
pub(super) type Item = (String, usize);

#[derive(Default)]
pub(super) struct Ready {
    slots: VecDeque<Item>,
    hosts: BTreeMap<String, HostLane>,
    /// The host served last, so that hosts take turns.
    last_host: Option<String>,
}

#[derive(Default)]
struct HostLane {
    waiting: VecDeque<Item>,
    running: usize,
}

impl Ready {
    /// Queues `item`; `host` for an HTTP delivery.
    pub(super) fn push(&mut self, host: Option<String>, item: Item) {
        match host {
            None => self.slots.push_back(item),
            Some(host) => self.hosts.entry(host).or_default().waiting.push_back(item),
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.slots.len() + self.hosts.values().map(|h| h.waiting.len()).sum::<usize>()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.hosts.values().all(|h| h.waiting.is_empty())
    }

    #[cfg(test)]
    pub(super) fn iter(&self) -> impl Iterator<Item = &Item> {
        self.slots
            .iter()
            .chain(self.hosts.values().flat_map(|h| h.waiting.iter()))
    }

    /// Drops every waiting delivery of message `id`.
    pub(super) fn remove_message(&mut self, id: &str) {
        self.slots.retain(|(r, _)| r != id);
        for lane in self.hosts.values_mut() {
            lane.waiting.retain(|(r, _)| r != id);
        }
        self.hosts
            .retain(|_, lane| !lane.waiting.is_empty() || lane.running > 0);
    }

    /// The next program, handler or forward.
    pub(super) fn next_slot(&mut self) -> Option<Item> {
        self.slots.pop_front()
    }

    /// The next HTTP delivery of a host with room, hosts taking turns;
    /// counted as running on its host until [`Ready::http_done`].
    pub(super) fn next_http(&mut self, max_per_host: usize) -> Option<(String, Item)> {
        let after = match &self.last_host {
            Some(last) => Bound::Excluded(last.clone()),
            None => Bound::Unbounded,
        };
        let host = self
            .hosts
            .range((after.clone(), Bound::Unbounded))
            .chain(self.hosts.range((Bound::Unbounded, invert(&after))))
            .find(|(_, lane)| !lane.waiting.is_empty() && lane.running < max_per_host)
            .map(|(host, _)| host.clone())?;
        let lane = self.hosts.get_mut(&host)?;
        let item = lane.waiting.pop_front()?;
        lane.running += 1;
        self.last_host = Some(host.clone());
        Some((host, item))
    }

    /// An HTTP delivery to `host` has been answered.
    pub(super) fn http_done(&mut self, host: &str) {
        if let Some(lane) = self.hosts.get_mut(host) {
            lane.running = lane.running.saturating_sub(1);
            if lane.running == 0 && lane.waiting.is_empty() {
                self.hosts.remove(host);
            }
        }
    }
}

/// The hosts up to and including the last one served: the second half of
/// the turn.
fn invert(after: &Bound<String>) -> Bound<String> {
    match after {
        Bound::Excluded(last) => Bound::Included(last.clone()),
        _ => Bound::Excluded(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str) -> Item {
        (id.to_string(), 0)
    }

    #[test]
    fn a_full_host_leaves_the_others_and_the_programs_going() {
        let mut ready = Ready::default();
        for id in ["s1", "s2", "s3"] {
            ready.push(Some("http://slow:80".into()), item(id));
        }
        ready.push(Some("http://fast:80".into()), item("f1"));
        ready.push(None, item("p1"));
        assert_eq!(ready.len(), 5);
        let mut hosts = Vec::new();
        while let Some((host, (id, _))) = ready.next_http(2) {
            hosts.push((host, id));
        }
        // slow gets its two, fast its one, the third of slow waits.
        assert_eq!(hosts.len(), 3, "{hosts:?}");
        assert!(hosts.iter().any(|(_, id)| id == "f1"));
        assert_eq!(ready.next_slot(), Some(item("p1")));
        assert_eq!(ready.len(), 1);
        ready.http_done("http://slow:80");
        assert_eq!(
            ready.next_http(2),
            Some(("http://slow:80".to_string(), item("s3")))
        );
        assert!(ready.is_empty());
    }

    #[test]
    fn hosts_take_turns() {
        let mut ready = Ready::default();
        for n in 0..3 {
            ready.push(Some("a".into()), item(&format!("a{n}")));
            ready.push(Some("b".into()), item(&format!("b{n}")));
        }
        let order: Vec<String> = std::iter::from_fn(|| ready.next_http(10))
            .map(|(_, (id, _))| id)
            .collect();
        assert_eq!(order, ["a0", "b0", "a1", "b1", "a2", "b2"]);
    }

    #[test]
    fn removing_a_message_empties_every_lane_of_it() {
        let mut ready = Ready::default();
        ready.push(None, ("m".into(), 0));
        ready.push(Some("h".into()), ("m".into(), 1));
        ready.push(Some("h".into()), ("n".into(), 0));
        ready.remove_message("m");
        assert_eq!(ready.iter().cloned().collect::<Vec<_>>(), vec![item("n")]);
        ready.remove_message("n");
        assert!(ready.is_empty());
        assert!(ready.hosts.is_empty());
    }
}
