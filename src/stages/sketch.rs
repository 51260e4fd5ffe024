//! A DDSketch (Masson, Rim, Lee: "DDSketch: A fast and fully-mergeable
//! quantile sketch with relative-error guarantees", VLDB 2019) with dense
//! bucket stores, for medians and other quantiles of a pane.
//!
//! **Why this sketch.** Its error is a deterministic bound on the value, not
//! on the rank and not probabilistic: with relative accuracy `α`, the value
//! it reports for quantile `q` is within `α·|x|` of `x`, the exact value of
//! rank `⌊q·(n−1)⌋` of the values added. The bound holds for any input
//! (skewed, bimodal, heavy-tailed), and sketches merge by adding bucket
//! counts, which loses nothing: the merge of the sketches of several panes
//! or nodes is the sketch of all their values. t-digest has neither
//! property (its error depends on the data and on the merge order).
//!
//! **The arithmetic.** With `γ = (1+α)/(1−α)`, a positive value `x` goes
//! to bucket `i = ⌈log_γ x⌉`, which holds `(γ^(i−1), γ^i]`. The bucket's
//! estimate `v = 2γ^i/(γ+1)` satisfies, for every `x` in it,
//! `|v − x| / x ≤ (γ−1)/(γ+1) = α`. Buckets are counted, so the bucket that
//! holds rank `r` is found by a walk over the counts, and its estimate is
//! within `α` of the value of rank `r`. Negative values use a second store
//! on `|x|` (their order reversed); values with `|x|` below
//! [`MIN_MAGNITUDE`] count as zero and are reported as 0 exactly.
//! With `α = 1 %` a store spans `1e-9..1e12` in about 2 400 buckets; a
//! store only holds the range of indices it has seen.

/// Magnitudes below this count as zero.
pub const MIN_MAGNITUDE: f64 = 1e-9;

/// Counts per bucket index over a contiguous range of indices.
#[derive(Debug, Clone, Default, PartialEq)]
struct Store {
    /// Index of `counts[0]`.
    offset: i32,
    counts: Vec<u64>,
    total: u64,
}

impl Store {
    /// Grows the range of indices to include `lo..=hi`, to the exact size.
    fn cover(&mut self, lo: i32, hi: i32) {
        if self.counts.is_empty() {
            self.offset = lo;
            self.counts = vec![0; (hi - lo) as usize + 1];
            return;
        }
        if lo < self.offset {
            let grow = (self.offset - lo) as usize;
            self.counts.reserve_exact(grow);
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.offset = lo;
        }
        let end = self.offset + self.counts.len() as i32;
        if hi >= end {
            // A little room beyond, so that values arriving in rising
            // order do not reallocate at every new bucket.
            let grow = (hi - end) as usize + 1;
            self.counts.reserve_exact(grow.max(16));
            self.counts.resize(self.counts.len() + grow, 0);
        }
    }

    fn add(&mut self, index: i32, n: u64) {
        self.cover(index, index);
        self.counts[(index - self.offset) as usize] += n;
        self.total += n;
    }

    /// Adds `other`'s counts: one pass over its range.
    fn merge(&mut self, other: &Store) {
        if other.counts.is_empty() {
            return;
        }
        self.cover(other.offset, other.offset + other.counts.len() as i32 - 1);
        let start = (other.offset - self.offset) as usize;
        for (mine, theirs) in self.counts[start..].iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
    }

    /// The index holding rank `rank` (0-based) counted from the lowest
    /// index, or from the highest with `from_top`.
    fn index_at(&self, rank: u64, from_top: bool) -> i32 {
        let mut seen = 0;
        let n = self.counts.len();
        for k in 0..n {
            let i = if from_top { n - 1 - k } else { k };
            seen += self.counts[i];
            if seen > rank {
                return self.offset + i as i32;
            }
        }
        self.offset + n.saturating_sub(1) as i32
    }
}

/// A quantile sketch with relative accuracy `alpha`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sketch {
    alpha: f64,
    gamma_ln: f64,
    positive: Store,
    negative: Store,
    zeros: u64,
}

impl Sketch {
    /// # Panics
    ///
    /// If `alpha` is not in `(0, 1)`.
    pub fn new(alpha: f64) -> Self {
        assert!(
            alpha > 0.0 && alpha < 1.0,
            "relative accuracy {alpha} not in (0, 1)"
        );
        let gamma = (1.0 + alpha) / (1.0 - alpha);
        Self {
            alpha,
            gamma_ln: gamma.ln(),
            positive: Store::default(),
            negative: Store::default(),
            zeros: 0,
        }
    }

    /// Bytes of its bucket stores on the heap.
    pub fn heap_bytes(&self) -> usize {
        (self.positive.counts.capacity() + self.negative.counts.capacity()) * std::mem::size_of::<u64>()
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    pub fn count(&self) -> u64 {
        self.positive.total + self.negative.total + self.zeros
    }

    fn index(&self, magnitude: f64) -> i32 {
        (magnitude.ln() / self.gamma_ln).ceil() as i32
    }

    fn estimate(&self, index: i32) -> f64 {
        let gamma = self.gamma_ln.exp();
        2.0 * (f64::from(index) * self.gamma_ln).exp() / (gamma + 1.0)
    }

    /// Adds `x`; not-a-number and infinities are ignored (returns false).
    pub fn add(&mut self, x: f64) -> bool {
        if !x.is_finite() {
            return false;
        }
        if x.abs() < MIN_MAGNITUDE {
            self.zeros += 1;
        } else if x > 0.0 {
            self.positive.add(self.index(x), 1);
        } else {
            self.negative.add(self.index(-x), 1);
        }
        true
    }

    /// Adds every value of `other` (same accuracy).
    ///
    /// # Panics
    ///
    /// If the accuracies differ.
    pub fn merge(&mut self, other: &Sketch) {
        assert!(
            (self.alpha - other.alpha).abs() < f64::EPSILON,
            "merging sketches of different accuracy"
        );
        self.positive.merge(&other.positive);
        self.negative.merge(&other.negative);
        self.zeros += other.zeros;
    }

    /// The value of rank `⌊q·(n−1)⌋`, within the relative accuracy; `None`
    /// when empty or `q` is not in `[0, 1]`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = (q * (n - 1) as f64).floor() as u64;
        let negatives = self.negative.total;
        if rank < negatives {
            // The most negative values have the largest magnitudes.
            return Some(-self.estimate(self.negative.index_at(rank, true)));
        }
        if rank < negatives + self.zeros {
            return Some(0.0);
        }
        let rank = rank - negatives - self.zeros;
        Some(self.estimate(self.positive.index_at(rank, false)))
    }

    /// `[alpha, zeros, [neg offset, counts...], [pos offset, counts...]]`
    /// for the partial results nodes exchange.
    pub fn to_json(&self) -> serde_json::Value {
        let store = |s: &Store| {
            let mut v = vec![serde_json::Value::from(s.offset)];
            v.extend(s.counts.iter().map(|&c| serde_json::Value::from(c)));
            serde_json::Value::Array(v)
        };
        serde_json::json!([
            self.alpha,
            self.zeros,
            store(&self.negative),
            store(&self.positive)
        ])
    }

    /// The inverse of [`Self::to_json`]; `None` if malformed.
    pub fn from_json(value: &serde_json::Value) -> Option<Self> {
        let parts = value.as_array()?;
        let alpha = parts.first()?.as_f64()?;
        if !(alpha > 0.0 && alpha < 1.0) {
            return None;
        }
        let mut sketch = Sketch::new(alpha);
        sketch.zeros = parts.get(1)?.as_u64()?;
        for (store, part) in [
            (&mut sketch.negative, parts.get(2)?),
            (&mut sketch.positive, parts.get(3)?),
        ] {
            let items = part.as_array()?;
            let offset = i32::try_from(items.first()?.as_i64()?).ok()?;
            for (i, c) in items[1..].iter().enumerate() {
                let c = c.as_u64()?;
                if c > 0 {
                    store.add(offset.checked_add(i32::try_from(i).ok()?)?, c);
                }
            }
        }
        Some(sketch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact(values: &mut [f64], q: f64) -> f64 {
        values.sort_by(f64::total_cmp);
        values[(q * (values.len() - 1) as f64).floor() as usize]
    }

    fn within(got: f64, want: f64, alpha: f64) -> bool {
        (got - want).abs() <= alpha * want.abs() + 1e-12
    }

    #[test]
    fn zero_negative_and_empty() {
        let mut s = Sketch::new(0.01);
        assert_eq!(s.quantile(0.5), None);
        for x in [-5.0, 0.0, 0.0, 3.0, 1e-12] {
            s.add(x);
        }
        assert_eq!(s.quantile(0.5), Some(0.0));
        assert!(within(s.quantile(0.0).unwrap(), -5.0, 0.01));
        assert!(within(s.quantile(1.0).unwrap(), 3.0, 0.01));
        assert!(!s.add(f64::NAN));
        assert_eq!(s.count(), 5);
    }

    proptest! {
        #[test]
        fn every_quantile_is_within_alpha_of_the_exact_value_and_merging_loses_nothing(
            values in proptest::collection::vec(prop_oneof![-1e6..1e6f64, -1.0..1.0f64, Just(0.0)], 1..400),
            split in 0usize..400,
            q in 0.0..=1.0f64,
        ) {
            let alpha = 0.01;
            let mut whole = Sketch::new(alpha);
            let (mut a, mut b) = (Sketch::new(alpha), Sketch::new(alpha));
            for (i, &x) in values.iter().enumerate() {
                whole.add(x);
                if i < split { a.add(x) } else { b.add(x) };
            }
            a.merge(&b);
            prop_assert_eq!(&a, &whole);
            let mut sorted = values.clone();
            let want = exact(&mut sorted, q);
            let got = whole.quantile(q).unwrap();
            let want = if want.abs() < MIN_MAGNITUDE { 0.0 } else { want };
            prop_assert!(within(got, want, alpha), "q {} got {} want {}", q, got, want);
            let back = Sketch::from_json(&whole.to_json());
            prop_assert_eq!(back.as_ref(), Some(&whole));
        }
    }
}
