//! Which source each chunk is asked of: a pure function of what the sources said they hold and
//! what was asked of them so far, so the policy is tested apart from any network.
//!
//! Sources come in tiers, nearest first (LAN peers, then the relay); the origin is the last
//! resort and is not planned here. Within a tier every chunk goes to the holder with the fewest
//! chunks assigned so far, which spreads a large download across every peer that has it; a
//! chunk no source of the tier holds is left for the next tier.

/// What one source answered about the chunks of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holds {
    /// A flag for each chunk asked about, in order.
    These(Vec<bool>),
    /// Not asked: the source is the only one of its tier, so it is asked for every chunk at
    /// once and skips what it lacks (a round trip, and a lookup per chunk at the source, spared).
    Unasked,
    /// It could not say (its connection failed): it is asked for nothing.
    Failed,
}

impl Holds {
    fn holds(&self, i: usize) -> bool {
        match self {
            Holds::These(bits) => bits.get(i).copied().unwrap_or(false),
            Holds::Unasked => true,
            Holds::Failed => false,
        }
    }
}

/// The chunks of a round (by index into what was asked) each source is asked for, and those no
/// source holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub per_source: Vec<Vec<usize>>,
    pub unheld: Vec<usize>,
}

/// Assigns `want` chunks (indices `0..want`) to sources by `holds` (one entry per source): each
/// chunk to the source that holds it with the fewest chunks assigned so far, the earlier source
/// on a tie.
pub fn assign(want: usize, holds: &[Holds]) -> Plan {
    let mut plan = Plan { per_source: vec![Vec::new(); holds.len()], unheld: Vec::new() };
    for i in 0..want {
        let best = (0..holds.len()).filter(|s| holds[*s].holds(i)).min_by_key(|s| plan.per_source[*s].len());
        match best {
            Some(s) => plan.per_source[s].push(i),
            None => plan.unheld.push(i),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn chunks_spread_over_holders_and_the_rest_is_left_for_the_next_tier() {
        let holds = [
            Holds::These(vec![true, true, true, true, false]),
            Holds::These(vec![true, true, false, true, false]),
            Holds::Failed,
        ];
        let plan = assign(5, &holds);
        assert_eq!(plan.per_source, vec![vec![0, 2], vec![1, 3], vec![]]);
        assert_eq!(plan.unheld, vec![4]);
    }

    #[test]
    fn a_sole_unasked_source_gets_everything_and_a_failed_one_nothing() {
        assert_eq!(assign(3, &[Holds::Unasked]).per_source, vec![vec![0, 1, 2]]);
        let plan = assign(3, &[Holds::Failed]);
        assert_eq!((plan.per_source, plan.unheld), (vec![vec![]], vec![0, 1, 2]));
        // A short answer holds nothing past its end.
        assert_eq!(assign(2, &[Holds::These(vec![true])]).unheld, vec![1]);
        assert_eq!(assign(0, &[]), Plan { per_source: vec![], unheld: vec![] });
    }

    proptest! {
        /// Every chunk is planned exactly once, only to a source that holds it (in the order
        /// asked), unheld only if nobody does, and always to its least loaded holder.
        #[test]
        fn every_chunk_goes_once_to_a_holder(
            want in 0usize..60,
            answers in proptest::collection::vec(
                prop_oneof![
                    Just(None),
                    Just(Some(None)),
                    proptest::collection::vec(any::<bool>(), 0..60).prop_map(|b| Some(Some(b))),
                ],
                0..5,
            ),
        ) {
            let holds: Vec<Holds> = answers
                .into_iter()
                .map(|a| match a {
                    None => Holds::Failed,
                    Some(None) => Holds::Unasked,
                    Some(Some(bits)) => Holds::These(bits),
                })
                .collect();
            let plan = assign(want, &holds);
            let mut seen = vec![0; want];
            for (s, list) in plan.per_source.iter().enumerate() {
                for &i in list {
                    prop_assert!(holds[s].holds(i));
                    seen[i] += 1;
                }
                prop_assert!(list.windows(2).all(|w| w[0] < w[1]), "in the order asked");
            }
            for &i in &plan.unheld {
                prop_assert!(holds.iter().all(|h| !h.holds(i)));
                seen[i] += 1;
            }
            prop_assert!(seen.iter().all(|n| *n == 1), "{seen:?}");
            // Balance: each chunk went to a holder with no more chunks assigned at that moment
            // than any other holder of it had.
            let mut load = vec![0usize; holds.len()];
            let owner: Vec<Option<usize>> = (0..want)
                .map(|i| plan.per_source.iter().position(|l| l.contains(&i)))
                .collect();
            for (i, o) in owner.iter().enumerate() {
                if let Some(s) = *o {
                    for (t, h) in holds.iter().enumerate() {
                        if h.holds(i) {
                            prop_assert!(load[s] <= load[t], "chunk {i}: {s} had {} and {t} {}", load[s], load[t]);
                        }
                    }
                    load[s] += 1;
                }
            }
        }
    }
}
