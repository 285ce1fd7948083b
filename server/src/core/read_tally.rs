//! What one read served, counted by the read path as it goes (no shared counter touched
//! per value) and handed to the metrics once per request.

use crate::registry::SurfaceId;

/// Upper bounds of the served-value age buckets, in seconds: a minute to 90 days.
pub const AGE_BUCKETS_SECONDS: [u64; 10] = [
    60,
    5 * 60,
    15 * 60,
    60 * 60,
    6 * 60 * 60,
    24 * 60 * 60,
    3 * 24 * 60 * 60,
    7 * 24 * 60 * 60,
    30 * 24 * 60 * 60,
    90 * 24 * 60 * 60,
];

/// [`AGE_BUCKETS_SECONDS`] in microseconds, the unit of event times.
const AGE_BUCKETS_MICROS: [u64; AGE_BUCKETS_SECONDS.len()] = {
    let mut micros = [0; AGE_BUCKETS_SECONDS.len()];
    let mut index = 0;
    while index < micros.len() {
        micros[index] = AGE_BUCKETS_SECONDS[index] * 1_000_000;
        index += 1;
    }
    micros
};

/// What one read served, counted locally by the read path and added to the metrics once.
#[derive(Debug, Default)]
pub struct ReadTally {
    /// Keys by row status, indexed by the `RowStatus` number.
    pub rows: [u64; 5],
    /// Values by value status, indexed by the `ValueStatus` number.
    pub values: [u64; 7],
    /// Ages of the values served, per surface (few per read).
    pub ages: Vec<(SurfaceId, SurfaceAges)>,
}

impl ReadTally {
    /// Adds what another part of the same read counted.
    pub fn absorb(&mut self, other: ReadTally) {
        for (total, part) in self.rows.iter_mut().zip(other.rows) {
            *total += part;
        }
        for (total, part) in self.values.iter_mut().zip(other.values) {
            *total += part;
        }
        for (surface, part) in other.ages {
            let ages = ages_on(&mut self.ages, surface);
            for (total, count) in ages.buckets.iter_mut().zip(part.buckets) {
                *total += count;
            }
            ages.count += part.count;
            ages.sum_micros += part.sum_micros;
        }
    }
}

/// Ages of the values served on one surface, bucketed like [`AGE_BUCKETS_SECONDS`].
#[derive(Debug, Default)]
pub struct SurfaceAges {
    pub(crate) buckets: [u64; AGE_BUCKETS_SECONDS.len() + 1],
    pub(crate) count: u64,
    pub(crate) sum_micros: u64,
    /// The last age counted and its bucket: the values a row's write stored together
    /// share their event time, so most values find their bucket here.
    last: Option<(u64, usize)>,
}

/// The ages of the values served on `surface`, among a read's `ages`.
pub fn ages_on(ages: &mut Vec<(SurfaceId, SurfaceAges)>, surface: SurfaceId) -> &mut SurfaceAges {
    let index = match ages.iter().position(|(id, _)| *id == surface) {
        Some(index) => index,
        None => {
            ages.push((surface, SurfaceAges::default()));
            ages.len() - 1
        }
    };
    &mut ages[index].1
}

impl SurfaceAges {
    /// Counts a value served `age_micros` after the interaction it was derived from (a
    /// value from the future counts as age zero).
    pub fn add(&mut self, age_micros: i64) {
        // On the read path, once per value served: compares only, no division.
        let micros = u64::try_from(age_micros).unwrap_or(0);
        let bucket = match self.last {
            Some((last, bucket)) if last == micros => bucket,
            _ => {
                let bucket = AGE_BUCKETS_MICROS
                    .iter()
                    .position(|&bound| micros <= bound)
                    .unwrap_or(AGE_BUCKETS_MICROS.len());
                self.last = Some((micros, bucket));
                bucket
            }
        };
        self.buckets[bucket] += 1;
        self.count += 1;
        self.sum_micros = self.sum_micros.saturating_add(micros);
    }
}
