//! Recent idempotency keys and their answers, kept per instance and saved in its checkpoints,
//! so a retried key gets the first answer and is not applied twice.

use std::collections::{HashMap, VecDeque};

use super::Answer;

/// How many keys an instance remembers.
pub(crate) const CAPACITY: usize = 1024;

#[derive(Debug, Default, Clone)]
pub(crate) struct AnswerCache {
    order: VecDeque<String>,
    answers: HashMap<String, Answer>,
}

impl AnswerCache {
    /// The cache of `entries`, oldest first (as a checkpoint lists them).
    pub(crate) fn from_oldest_first(entries: Vec<(String, Answer)>) -> Self {
        let room = entries.len().min(CAPACITY) + 1;
        let mut cache = Self { order: VecDeque::with_capacity(room), answers: HashMap::with_capacity(room) };
        for (key, answer) in entries {
            cache.insert(key, answer);
        }
        cache
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Answer> {
        self.answers.get(key)
    }

    pub(crate) fn insert(&mut self, key: String, answer: Answer) {
        if self.answers.insert(key.clone(), answer).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.answers.remove(&old);
            }
        }
    }

    /// Oldest first.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (&String, &Answer)> {
        self.order.iter().filter_map(|k| self.answers.get(k).map(|a| (k, a)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_keys() {
        let mut c = AnswerCache::default();
        for i in 0..CAPACITY + 10 {
            c.insert(format!("k{i}"), Answer { status: 0, output: vec![i as u8] });
        }
        assert!(c.get("k0").is_none());
        assert_eq!(c.get(&format!("k{}", CAPACITY + 9)).unwrap().output, vec![(CAPACITY + 9) as u8]);
        assert_eq!(c.entries().count(), CAPACITY);
    }

    #[test]
    fn a_checkpoint_list_builds_the_same_cache_as_inserting_it() {
        let list: Vec<(String, Answer)> =
            (0..CAPACITY + 3).map(|i| (format!("k{i}"), Answer { status: 0, output: vec![i as u8] })).collect();
        let mut inserted = AnswerCache::default();
        for (k, a) in list.clone() {
            inserted.insert(k, a);
        }
        let built = AnswerCache::from_oldest_first(list);
        let entries = |c: &AnswerCache| c.entries().map(|(k, a)| (k.clone(), a.output.clone())).collect::<Vec<_>>();
        assert_eq!(entries(&built), entries(&inserted));
        assert_eq!(built.entries().count(), CAPACITY);
        assert!(built.get("k0").is_none(), "the oldest key is forgotten");
    }
}
