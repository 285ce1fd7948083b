//! Tests of the metrics: what each call counts, and the text a scrape reads.

use super::*;

fn rendered(metrics: &Metrics) -> String {
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &metrics.registry)
        .expect("the registry renders");
    text
}

#[test]
fn ages_fall_in_the_bucket_of_their_upper_bound() {
    let mut ages = SurfaceAges::default();
    ages.add(-5);
    ages.add(60 * 1_000_000);
    ages.add(61 * 1_000_000);
    ages.add(100 * 24 * 60 * 60 * 1_000_000);
    assert_eq!(
        ages.buckets[0], 2,
        "zero (from the future) and exactly a minute"
    );
    assert_eq!(ages.buckets[1], 1);
    assert_eq!(
        ages.buckets[AGE_BUCKETS_SECONDS.len()],
        1,
        "older than 90 days"
    );
    assert_eq!(ages.count, 4);
}

#[test]
fn a_write_is_counted_per_value_per_surface_and_per_reason() {
    let metrics = Metrics::new([(SurfaceId(1), "feed".to_string())]);
    let refused = |reasons: Vec<i32>| proto::SurfaceOutcome {
        surface: "ads".to_string(),
        outcome: proto::Outcome::Refused as i32,
        reasons,
    };
    let stored = proto::SurfaceOutcome {
        surface: "feed".to_string(),
        outcome: proto::Outcome::Stored as i32,
        reasons: Vec::new(),
    };
    let sensitive = proto::ReasonCode::SensitiveTopicForAds as i32;
    let minor = proto::ReasonCode::MinorOrUnknownAgeForAds as i32;
    let response = proto::WriteFeaturesResponse {
        rows: vec![proto::RowResult {
            verdicts: vec![
                proto::FeatureVerdict {
                    verdict: proto::Verdict::AllowWithTransform as i32,
                    surfaces: vec![stored.clone(), refused(vec![sensitive, minor])],
                    ..Default::default()
                },
                proto::FeatureVerdict {
                    verdict: proto::Verdict::Deny as i32,
                    surfaces: vec![refused(vec![sensitive])],
                    ..Default::default()
                },
            ],
        }],
        ..Default::default()
    };
    metrics.write(&response);
    // A replayed answer wrote nothing and counts nothing.
    metrics.write(&proto::WriteFeaturesResponse {
        replayed: true,
        ..response
    });
    let text = rendered(&metrics);
    for line in [
        "featurestore_write_verdicts_total{verdict=\"allow_with_transform\"} 1",
        "featurestore_write_verdicts_total{verdict=\"deny\"} 1",
        "featurestore_write_outcomes_total{outcome=\"stored\"} 1",
        "featurestore_write_outcomes_total{outcome=\"refused\"} 2",
        "featurestore_write_refusals_total{reason=\"SENSITIVE_TOPIC_FOR_ADS\"} 2",
        "featurestore_write_refusals_total{reason=\"MINOR_OR_UNKNOWN_AGE_FOR_ADS\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
}

#[test]
fn made_up_paths_share_one_label() {
    let metrics = Metrics::new([]);
    let known = metrics.method("/featurestore.v1.FeatureStore/GetFeatures");
    assert_eq!(&*known.method.0, "GetFeatures");
    assert_eq!(&*known.service.0, "featurestore.v1.FeatureStore");
    for path in ["/featurestore.v1.FeatureStore/Nope", "/x/y", "nonsense"] {
        assert_eq!(&*metrics.method(path).method.0, "unknown");
    }
    assert_eq!(metrics.methods.read().len(), 1);
}
