//! How the columns of a backfill file map onto write rows. The same flat layout serves
//! JSON Lines, CSV and Parquet: one record per row, with these columns:
//!
//! | column | required | content |
//! |---|---|---|
//! | `user_id` | yes | platform user id |
//! | `surfaces` | yes | target surfaces: a list, or names separated by commas |
//! | `source` | yes | registered source |
//! | `origin_app` | yes | app of the interaction |
//! | `interaction_time_unix_micros` | yes | event time, microseconds since the epoch |
//! | `producer_id` | unless `--producer` | producing pipeline and version |
//! | `microphone_permission_granted` | no | true / false |
//! | `user_state_generation` | no | generation the producer saw |
//! | *feature name* | — | the feature's value; empty or null leaves it out |
//! | *feature*`.topic_id`, *feature*`.topic_confidence` | no | topic of a topic feature |
//!
//! Float vectors are lists (JSON arrays in text formats), sparse values are JSON objects
//! from topic to weight.

use std::collections::HashMap;

use anyhow::{Context, bail};
use featurestore::proto;

pub const USER_ID: &str = "user_id";
pub const SURFACES: &str = "surfaces";
pub const SOURCE: &str = "source";
pub const ORIGIN_APP: &str = "origin_app";
pub const INTERACTION_TIME: &str = "interaction_time_unix_micros";
pub const PRODUCER_ID: &str = "producer_id";
pub const MICROPHONE: &str = "microphone_permission_granted";
pub const GENERATION: &str = "user_state_generation";
const TOPIC_ID_SUFFIX: &str = ".topic_id";
const TOPIC_CONFIDENCE_SUFFIX: &str = ".topic_confidence";

/// One cell of a record, as the file format holds it.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell<'a> {
    Null,
    Text(&'a str),
    Int(i64),
    UInt(u64),
    Float(f64),
    Bool(bool),
    Floats(Vec<f32>),
    Texts(Vec<String>),
    Json(&'a serde_json::Value),
}

/// A record of a file: its cells by column index.
pub trait Record {
    fn cell(&self, column: usize) -> Cell<'_>;
}

#[derive(Clone, Debug)]
struct FeatureColumn {
    column: usize,
    name: String,
    value_type: proto::ValueType,
    topic_id: Option<usize>,
    topic_confidence: Option<usize>,
}

/// The column of each part of a write row.
#[derive(Clone, Debug)]
pub struct Layout {
    user_id: usize,
    surfaces: usize,
    source: usize,
    origin_app: usize,
    interaction_time: usize,
    producer_id: Option<usize>,
    microphone: Option<usize>,
    generation: Option<usize>,
    features: Vec<FeatureColumn>,
    default_producer: Option<String>,
}

impl Layout {
    /// Every column name a file may have with these registered features.
    pub fn known_columns(features: &[proto::FeatureDefinition]) -> Vec<String> {
        let mut columns: Vec<String> = [
            USER_ID,
            SURFACES,
            SOURCE,
            ORIGIN_APP,
            INTERACTION_TIME,
            PRODUCER_ID,
            MICROPHONE,
            GENERATION,
        ]
        .iter()
        .map(|name| name.to_string())
        .collect();
        for feature in features {
            columns.push(feature.name.clone());
            columns.push(format!("{}{TOPIC_ID_SUFFIX}", feature.name));
            columns.push(format!("{}{TOPIC_CONFIDENCE_SUFFIX}", feature.name));
        }
        columns
    }

    /// Maps `columns` (a file's header) against the registered features. Unknown columns
    /// and missing required ones are refused by name.
    pub fn new(
        columns: &[String],
        features: &[proto::FeatureDefinition],
        default_producer: Option<&str>,
    ) -> anyhow::Result<Layout> {
        let index: HashMap<&str, usize> = columns
            .iter()
            .enumerate()
            .map(|(index, name)| (name.as_str(), index))
            .collect();
        if index.len() != columns.len() {
            bail!("a column name appears twice in the header");
        }
        let registered: HashMap<&str, &proto::FeatureDefinition> = features
            .iter()
            .map(|feature| (feature.name.as_str(), feature))
            .collect();
        for name in columns {
            let base = name
                .strip_suffix(TOPIC_ID_SUFFIX)
                .or_else(|| name.strip_suffix(TOPIC_CONFIDENCE_SUFFIX))
                .unwrap_or(name);
            let fixed = [
                USER_ID,
                SURFACES,
                SOURCE,
                ORIGIN_APP,
                INTERACTION_TIME,
                PRODUCER_ID,
                MICROPHONE,
                GENERATION,
            ];
            if !fixed.contains(&name.as_str()) && !registered.contains_key(base) {
                bail!(
                    "column {name:?} is neither a row field ({}) nor a registered feature",
                    fixed.join(", ")
                );
            }
        }
        let required = |name: &str| {
            index
                .get(name)
                .copied()
                .with_context(|| format!("the required column {name:?} is missing"))
        };
        if !index.contains_key(PRODUCER_ID) && default_producer.is_none() {
            bail!("the file has no {PRODUCER_ID:?} column: give one with --producer");
        }
        let features: Vec<FeatureColumn> = features
            .iter()
            .filter_map(|feature| {
                Some(FeatureColumn {
                    column: *index.get(feature.name.as_str())?,
                    name: feature.name.clone(),
                    value_type: feature.value_type(),
                    topic_id: index
                        .get(format!("{}{TOPIC_ID_SUFFIX}", feature.name).as_str())
                        .copied(),
                    topic_confidence: index
                        .get(format!("{}{TOPIC_CONFIDENCE_SUFFIX}", feature.name).as_str())
                        .copied(),
                })
            })
            .collect();
        if features.is_empty() {
            bail!("the file has no column of a registered feature");
        }
        Ok(Layout {
            user_id: required(USER_ID)?,
            surfaces: required(SURFACES)?,
            source: required(SOURCE)?,
            origin_app: required(ORIGIN_APP)?,
            interaction_time: required(INTERACTION_TIME)?,
            producer_id: index.get(PRODUCER_ID).copied(),
            microphone: index.get(MICROPHONE).copied(),
            generation: index.get(GENERATION).copied(),
            features,
            default_producer: default_producer.map(str::to_string),
        })
    }

    /// The write row of a record, or what is wrong with it.
    pub fn row(&self, record: &dyn Record) -> Result<proto::WriteRow, String> {
        let user_id = uint(record.cell(self.user_id), USER_ID)?;
        let target_surfaces = texts(record.cell(self.surfaces), SURFACES)?;
        let producer_id = match self.producer_id.map(|column| record.cell(column)) {
            Some(Cell::Null) | None => self.default_producer.clone().unwrap_or_default(),
            Some(cell) => text(cell, PRODUCER_ID)?,
        };
        let provenance = proto::Provenance {
            source: text(record.cell(self.source), SOURCE)?,
            origin_app: text(record.cell(self.origin_app), ORIGIN_APP)?,
            interaction_time_unix_micros: int(
                record.cell(self.interaction_time),
                INTERACTION_TIME,
            )?,
            producer_id,
            microphone_permission_granted: match self.microphone {
                Some(column) => optional(record.cell(column))
                    .map(|cell| boolean(cell, MICROPHONE))
                    .transpose()?
                    .unwrap_or(false),
                None => false,
            },
        };
        let user_state_generation = match self.generation {
            Some(column) => optional(record.cell(column))
                .map(|cell| uint(cell, GENERATION))
                .transpose()?
                .unwrap_or(0),
            None => 0,
        };
        let mut features = Vec::with_capacity(self.features.len());
        for feature in &self.features {
            let Some(cell) = optional(record.cell(feature.column)) else {
                continue;
            };
            let value = feature_value(cell, feature)?;
            let topic_id = match feature
                .topic_id
                .and_then(|column| optional(record.cell(column)))
            {
                Some(cell) => text(cell, &feature.name)?,
                None => String::new(),
            };
            let topic_confidence = match feature
                .topic_confidence
                .and_then(|column| optional(record.cell(column)))
            {
                Some(cell) => Some(float(cell, &feature.name)?),
                None => None,
            };
            features.push(proto::FeatureValue {
                name: feature.name.clone(),
                value: Some(value),
                topic_id,
                topic_confidence,
                ttl_seconds: 0,
            });
        }
        if features.is_empty() {
            return Err("no feature value in the row".to_string());
        }
        Ok(proto::WriteRow {
            user_id,
            target_surfaces,
            provenance: Some(provenance),
            features,
            user_state_generation,
        })
    }
}

/// `None` for an empty cell.
fn optional(cell: Cell<'_>) -> Option<Cell<'_>> {
    match cell {
        Cell::Null | Cell::Json(serde_json::Value::Null) => None,
        Cell::Text("") => None,
        cell => Some(cell),
    }
}

fn wrong(column: &str, expected: &str, cell: &Cell<'_>) -> String {
    let found = match cell {
        Cell::Null | Cell::Json(serde_json::Value::Null) => "nothing".to_string(),
        Cell::Text(text) => format!("{text:?}"),
        Cell::Int(number) => number.to_string(),
        Cell::UInt(number) => number.to_string(),
        Cell::Float(number) => number.to_string(),
        Cell::Bool(flag) => flag.to_string(),
        Cell::Floats(_) => "a list of numbers".to_string(),
        Cell::Texts(_) => "a list of strings".to_string(),
        Cell::Json(value) => {
            let mut shown = value.to_string();
            shown.truncate(40);
            shown
        }
    };
    format!("{column}: expected {expected}, found {found}")
}

fn uint(cell: Cell<'_>, column: &str) -> Result<u64, String> {
    match &cell {
        Cell::UInt(number) => Some(*number),
        Cell::Int(number) => u64::try_from(*number).ok(),
        Cell::Text(text) => text.trim().parse().ok(),
        Cell::Json(value) => value.as_u64(),
        _ => None,
    }
    .ok_or_else(|| wrong(column, "a whole number ≥ 0", &cell))
}

fn int(cell: Cell<'_>, column: &str) -> Result<i64, String> {
    match &cell {
        Cell::Int(number) => Some(*number),
        Cell::UInt(number) => i64::try_from(*number).ok(),
        Cell::Text(text) => text.trim().parse().ok(),
        Cell::Json(value) => value.as_i64(),
        _ => None,
    }
    .ok_or_else(|| wrong(column, "a whole number", &cell))
}

fn float(cell: Cell<'_>, column: &str) -> Result<f32, String> {
    match &cell {
        Cell::Float(number) => Some(*number as f32),
        Cell::Int(number) => Some(*number as f32),
        Cell::UInt(number) => Some(*number as f32),
        Cell::Text(text) => text.trim().parse().ok(),
        Cell::Json(value) => value.as_f64().map(|number| number as f32),
        _ => None,
    }
    .ok_or_else(|| wrong(column, "a number", &cell))
}

fn boolean(cell: Cell<'_>, column: &str) -> Result<bool, String> {
    match &cell {
        Cell::Bool(flag) => Some(*flag),
        Cell::Int(number) if *number == 0 || *number == 1 => Some(*number == 1),
        Cell::Text(text) => match text.trim() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        },
        Cell::Json(value) => value.as_bool(),
        _ => None,
    }
    .ok_or_else(|| wrong(column, "true or false", &cell))
}

fn text(cell: Cell<'_>, column: &str) -> Result<String, String> {
    match &cell {
        Cell::Text(text) => Some(text.to_string()),
        Cell::Json(serde_json::Value::String(text)) => Some(text.clone()),
        _ => None,
    }
    .ok_or_else(|| wrong(column, "a string", &cell))
}

/// A list of names: a list, or one string with the names separated by commas.
fn texts(cell: Cell<'_>, column: &str) -> Result<Vec<String>, String> {
    let split = |text: &str| -> Vec<String> {
        text.split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .collect()
    };
    match &cell {
        Cell::Texts(names) => Some(names.clone()),
        Cell::Text(text) => Some(split(text)),
        Cell::Json(serde_json::Value::String(text)) => Some(split(text)),
        Cell::Json(serde_json::Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string))
            .collect(),
        _ => None,
    }
    .ok_or_else(|| wrong(column, "a list of names", &cell))
}

fn feature_value(
    cell: Cell<'_>,
    feature: &FeatureColumn,
) -> Result<proto::feature_value::Value, String> {
    use proto::feature_value::Value;
    let name = feature.name.as_str();
    match feature.value_type {
        proto::ValueType::Float => Ok(Value::FloatValue(float(cell, name)?)),
        proto::ValueType::Int64 => Ok(Value::Int64Value(int(cell, name)?)),
        proto::ValueType::String => Ok(Value::StringValue(text(cell, name)?)),
        proto::ValueType::FloatVector => {
            let values = match &cell {
                Cell::Floats(values) => Some(values.clone()),
                Cell::Text(text) => serde_json::from_str::<Vec<f32>>(text).ok(),
                Cell::Json(serde_json::Value::Array(items)) => items
                    .iter()
                    .map(|item| item.as_f64().map(|number| number as f32))
                    .collect(),
                _ => None,
            }
            .ok_or_else(|| wrong(name, "a list of numbers", &cell))?;
            Ok(Value::VectorValue(proto::FloatVector { values }))
        }
        proto::ValueType::Sparse => {
            let parsed;
            let object = match &cell {
                Cell::Text(text) => {
                    parsed = serde_json::from_str::<serde_json::Value>(text).ok();
                    parsed.as_ref().and_then(serde_json::Value::as_object)
                }
                Cell::Json(value) => value.as_object(),
                _ => None,
            }
            .ok_or_else(|| wrong(name, "an object from topic to weight", &cell))?;
            let mut sparse = proto::SparseVector::default();
            for (topic, weight) in object {
                let weight = weight
                    .as_f64()
                    .ok_or_else(|| format!("{name}: the weight of {topic:?} is not a number"))?;
                sparse.topics.push(topic.clone());
                sparse.weights.push(weight as f32);
            }
            Ok(Value::SparseValue(sparse))
        }
        proto::ValueType::Unspecified => Err(format!("{name}: the registry gives no type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Texts(Vec<&'static str>);

    impl Record for Texts {
        fn cell(&self, column: usize) -> Cell<'_> {
            Cell::Text(self.0[column])
        }
    }

    fn registry() -> Vec<proto::FeatureDefinition> {
        vec![
            proto::FeatureDefinition {
                name: "interest_hiking".to_string(),
                value_type: proto::ValueType::Float as i32,
                ..Default::default()
            },
            proto::FeatureDefinition {
                name: "topic_embedding".to_string(),
                value_type: proto::ValueType::FloatVector as i32,
                dimension: 2,
                ..Default::default()
            },
        ]
    }

    fn columns(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn a_text_record_becomes_a_write_row() {
        let layout = Layout::new(
            &columns(&[
                "user_id",
                "surfaces",
                "source",
                "origin_app",
                "interaction_time_unix_micros",
                "interest_hiking",
                "topic_embedding",
            ]),
            &registry(),
            Some("backfill@v1"),
        )
        .expect("layout");
        let row = layout
            .row(&Texts(vec![
                "7",
                "facebook_feed, instagram_reels",
                "ai_chat",
                "facebook",
                "1000",
                "0.5",
                "",
            ]))
            .expect("row");
        assert_eq!(row.user_id, 7);
        assert_eq!(
            row.target_surfaces,
            vec!["facebook_feed", "instagram_reels"]
        );
        assert_eq!(
            row.features.len(),
            1,
            "an empty cell leaves the feature out"
        );
        assert_eq!(
            row.provenance.expect("provenance").producer_id,
            "backfill@v1"
        );

        let problem = layout
            .row(&Texts(vec![
                "7",
                "facebook_feed",
                "ai_chat",
                "facebook",
                "soon",
                "0.5",
                "",
            ]))
            .expect_err("a bad time is refused");
        assert!(
            problem.contains("interaction_time_unix_micros"),
            "{problem}"
        );
    }

    #[test]
    fn unknown_and_missing_columns_are_named() {
        let error = Layout::new(
            &columns(&["user_id", "interest_kayaking"]),
            &registry(),
            None,
        )
        .expect_err("unknown column");
        assert!(error.to_string().contains("interest_kayaking"), "{error}");
        let error = Layout::new(
            &columns(&["user_id", "surfaces", "interest_hiking"]),
            &registry(),
            Some("p"),
        )
        .expect_err("missing column");
        assert!(error.to_string().contains("source"), "{error}");
    }
}
