//! `featurestore generate`: writes a realistic backfill file (one row per user, values of
//! the registered features, event times over the last week) in any format the loader
//! reads, for tries and benchmarks. Deterministic for a given seed.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use arrow_array::builder::{
    BooleanBuilder, Float32Builder, Int64Builder, ListBuilder, StringBuilder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use featurestore::proto;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Value as Json};

use crate::load::formats::FileFormat;
use crate::load::layout::{
    GENERATION, INTERACTION_TIME, MICROPHONE, ORIGIN_APP, PRODUCER_ID, SOURCE, SURFACES, USER_ID,
};

/// Rows per Parquet row group.
const ROW_GROUP_ROWS: usize = 65_536;
const TOPICS: [&str; 8] = [
    "outdoors/hiking",
    "food/cooking",
    "sports/running",
    "travel/europe",
    "music/jazz",
    "tech/phones",
    "home/gardening",
    "arts/photography",
];
const WEEK_MICROS: i64 = 7 * 24 * 3600 * 1_000_000;

/// What to generate.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub path: PathBuf,
    pub format: FileFormat,
    pub users: u64,
    /// Id of the first user; the others follow.
    pub first_user: u64,
    pub seed: u64,
    /// Source of every row.
    pub source: String,
    /// Target surfaces of every row.
    pub surfaces: Vec<String>,
    /// Features to fill; empty for every registered feature the source may produce on
    /// all the surfaces.
    pub features: Vec<String>,
    pub producer: String,
    /// App every interaction happened in; half Facebook, half Instagram when `None`.
    pub origin_app: Option<String>,
    /// Event times fall in the week before this time.
    pub now_unix_micros: i64,
}

/// A small, fast, deterministic generator (SplitMix64).
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }
}

enum GeneratedValue {
    Float(f32),
    Int64(i64),
    Text(&'static str),
    Vector(Vec<f32>),
    Sparse(Vec<(&'static str, f32)>),
}

struct GeneratedRow {
    user_id: u64,
    origin_app: String,
    time: i64,
    values: Vec<GeneratedValue>,
}

/// The features to fill, with their definitions.
fn chosen_features<'a>(
    options: &GenerateOptions,
    registry: &'a [proto::FeatureDefinition],
) -> anyhow::Result<Vec<&'a proto::FeatureDefinition>> {
    let chosen: Vec<&proto::FeatureDefinition> = if options.features.is_empty() {
        registry
            .iter()
            .filter(|feature| {
                feature.sources.contains(&options.source)
                    && options
                        .surfaces
                        .iter()
                        .all(|surface| feature.surfaces.contains(surface))
            })
            .collect()
    } else {
        options
            .features
            .iter()
            .map(|name| {
                registry
                    .iter()
                    .find(|feature| &feature.name == name)
                    .with_context(|| format!("feature {name:?} is not registered"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    if chosen.is_empty() {
        bail!(
            "no registered feature comes from source {:?} on every one of {:?}",
            options.source,
            options.surfaces
        );
    }
    Ok(chosen)
}

fn generate_row(
    random: &mut Random,
    user_id: u64,
    features: &[&proto::FeatureDefinition],
    options: &GenerateOptions,
) -> GeneratedRow {
    let values = features
        .iter()
        .map(|feature| match feature.value_type() {
            proto::ValueType::Int64 => GeneratedValue::Int64(random.below(50) as i64),
            proto::ValueType::String => {
                GeneratedValue::Text(TOPICS[random.below(TOPICS.len() as u64) as usize])
            }
            proto::ValueType::FloatVector => GeneratedValue::Vector(
                (0..feature.dimension)
                    .map(|_| random.unit() * 2.0 - 1.0)
                    .collect(),
            ),
            proto::ValueType::Sparse => GeneratedValue::Sparse(
                (0..1 + random.below(3))
                    .map(|index| (TOPICS[index as usize * 2], random.unit()))
                    .collect(),
            ),
            _ => GeneratedValue::Float(random.unit()),
        })
        .collect();
    GeneratedRow {
        user_id,
        origin_app: match &options.origin_app {
            Some(app) => app.clone(),
            None if random.below(2) == 0 => "facebook".to_string(),
            None => "instagram".to_string(),
        },
        time: options.now_unix_micros - 1 - random.below(WEEK_MICROS as u64) as i64,
        values,
    }
}

fn json_of(value: &GeneratedValue) -> Json {
    match value {
        GeneratedValue::Float(number) => Json::from(f64::from(*number)),
        GeneratedValue::Int64(number) => Json::from(*number),
        GeneratedValue::Text(text) => Json::from(*text),
        GeneratedValue::Vector(values) => {
            Json::Array(values.iter().map(|v| Json::from(f64::from(*v))).collect())
        }
        GeneratedValue::Sparse(entries) => Json::Object(
            entries
                .iter()
                .map(|(topic, weight)| (topic.to_string(), Json::from(f64::from(*weight))))
                .collect(),
        ),
    }
}

/// Writes the file; returns the number of rows written.
pub fn generate(
    options: &GenerateOptions,
    registry: &[proto::FeatureDefinition],
) -> anyhow::Result<u64> {
    let features = chosen_features(options, registry)?;
    let file = File::create(&options.path)
        .with_context(|| format!("cannot create {}", options.path.display()))?;
    let mut random = Random(options.seed);
    let surfaces = options.surfaces.join(",");
    let rows = (0..options.users)
        .map(|index| generate_row(&mut random, options.first_user + index, &features, options));
    match options.format {
        FileFormat::Jsonl => {
            let mut out = BufWriter::with_capacity(1 << 20, file);
            for row in rows {
                let mut object = Map::new();
                object.insert(USER_ID.into(), Json::from(row.user_id));
                object.insert(SURFACES.into(), Json::from(options.surfaces.clone()));
                object.insert(SOURCE.into(), Json::from(options.source.clone()));
                object.insert(ORIGIN_APP.into(), Json::from(row.origin_app.clone()));
                object.insert(INTERACTION_TIME.into(), Json::from(row.time));
                object.insert(PRODUCER_ID.into(), Json::from(options.producer.clone()));
                for (feature, value) in features.iter().zip(&row.values) {
                    object.insert(feature.name.clone(), json_of(value));
                }
                serde_json::to_writer(&mut out, &object)?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        FileFormat::Csv => {
            let mut out = csv::Writer::from_writer(BufWriter::with_capacity(1 << 20, file));
            let mut header = vec![
                USER_ID.to_string(),
                SURFACES.to_string(),
                SOURCE.to_string(),
                ORIGIN_APP.to_string(),
                INTERACTION_TIME.to_string(),
                PRODUCER_ID.to_string(),
            ];
            header.extend(features.iter().map(|feature| feature.name.clone()));
            out.write_record(&header)?;
            for row in rows {
                let mut record = vec![
                    row.user_id.to_string(),
                    surfaces.clone(),
                    options.source.clone(),
                    row.origin_app.clone(),
                    row.time.to_string(),
                    options.producer.clone(),
                ];
                record.extend(row.values.iter().map(|value| match value {
                    GeneratedValue::Float(number) => number.to_string(),
                    GeneratedValue::Int64(number) => number.to_string(),
                    GeneratedValue::Text(text) => text.to_string(),
                    other => json_of(other).to_string(),
                }));
                out.write_record(&record)?;
            }
            out.flush()?;
        }
        FileFormat::Parquet => write_parquet(file, options, &features, rows)?,
    }
    Ok(options.users)
}

fn write_parquet(
    file: File,
    options: &GenerateOptions,
    features: &[&proto::FeatureDefinition],
    rows: impl Iterator<Item = GeneratedRow>,
) -> anyhow::Result<()> {
    let mut fields = vec![
        Field::new(USER_ID, DataType::UInt64, false),
        Field::new(SURFACES, DataType::Utf8, false),
        Field::new(SOURCE, DataType::Utf8, false),
        Field::new(ORIGIN_APP, DataType::Utf8, false),
        Field::new(INTERACTION_TIME, DataType::Int64, false),
        Field::new(PRODUCER_ID, DataType::Utf8, false),
        Field::new(MICROPHONE, DataType::Boolean, false),
        Field::new(GENERATION, DataType::UInt64, false),
    ];
    for feature in features {
        let data_type = match feature.value_type() {
            proto::ValueType::Int64 => DataType::Int64,
            proto::ValueType::String | proto::ValueType::Sparse => DataType::Utf8,
            proto::ValueType::FloatVector => {
                DataType::List(Arc::new(Field::new_list_field(DataType::Float32, true)))
            }
            _ => DataType::Float32,
        };
        fields.push(Field::new(feature.name.clone(), data_type, true));
    }
    let schema = Arc::new(Schema::new(fields));
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();
    let mut writer = ArrowWriter::try_new(file, Arc::clone(&schema), Some(properties))?;
    let surfaces = options.surfaces.join(",");
    let mut rows = rows.peekable();
    while rows.peek().is_some() {
        let mut user_ids = UInt64Builder::new();
        let mut surface_lists = StringBuilder::new();
        let mut sources = StringBuilder::new();
        let mut apps = StringBuilder::new();
        let mut times = Int64Builder::new();
        let mut producers = StringBuilder::new();
        let mut microphones = BooleanBuilder::new();
        let mut generations = UInt64Builder::new();
        let mut floats: Vec<Float32Builder> =
            features.iter().map(|_| Float32Builder::new()).collect();
        let mut ints: Vec<Int64Builder> = features.iter().map(|_| Int64Builder::new()).collect();
        let mut texts: Vec<StringBuilder> = features.iter().map(|_| StringBuilder::new()).collect();
        let mut vectors: Vec<ListBuilder<Float32Builder>> = features
            .iter()
            .map(|_| ListBuilder::new(Float32Builder::new()))
            .collect();
        for row in rows.by_ref().take(ROW_GROUP_ROWS) {
            user_ids.append_value(row.user_id);
            surface_lists.append_value(&surfaces);
            sources.append_value(&options.source);
            apps.append_value(&row.origin_app);
            times.append_value(row.time);
            producers.append_value(&options.producer);
            microphones.append_value(false);
            generations.append_value(0);
            for (index, value) in row.values.iter().enumerate() {
                match value {
                    GeneratedValue::Float(number) => floats[index].append_value(*number),
                    GeneratedValue::Int64(number) => ints[index].append_value(*number),
                    GeneratedValue::Text(text) => texts[index].append_value(text),
                    GeneratedValue::Vector(values) => {
                        vectors[index].values().append_slice(values);
                        vectors[index].append(true);
                    }
                    sparse @ GeneratedValue::Sparse(_) => {
                        texts[index].append_value(json_of(sparse).to_string());
                    }
                }
            }
        }
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(user_ids.finish()),
            Arc::new(surface_lists.finish()),
            Arc::new(sources.finish()),
            Arc::new(apps.finish()),
            Arc::new(times.finish()),
            Arc::new(producers.finish()),
            Arc::new(microphones.finish()),
            Arc::new(generations.finish()),
        ];
        for (index, feature) in features.iter().enumerate() {
            columns.push(match feature.value_type() {
                proto::ValueType::Int64 => Arc::new(ints[index].finish()),
                proto::ValueType::String | proto::ValueType::Sparse => {
                    Arc::new(texts[index].finish())
                }
                proto::ValueType::FloatVector => Arc::new(vectors[index].finish()),
                _ => Arc::new(floats[index].finish()),
            });
        }
        writer.write(&RecordBatch::try_new(Arc::clone(&schema), columns)?)?;
    }
    writer.close()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::formats::{Item, open};

    fn registry() -> Vec<proto::FeatureDefinition> {
        vec![
            proto::FeatureDefinition {
                name: "interest_hiking".to_string(),
                value_type: proto::ValueType::Float as i32,
                sources: vec!["ai_chat".to_string()],
                surfaces: vec!["facebook_feed".to_string()],
                ..Default::default()
            },
            proto::FeatureDefinition {
                name: "topic_embedding".to_string(),
                value_type: proto::ValueType::FloatVector as i32,
                dimension: 3,
                sources: vec!["ai_chat".to_string()],
                surfaces: vec!["facebook_feed".to_string()],
                ..Default::default()
            },
            proto::FeatureDefinition {
                name: "conversation_topics".to_string(),
                value_type: proto::ValueType::Sparse as i32,
                sources: vec!["ai_chat".to_string()],
                surfaces: vec!["facebook_feed".to_string()],
                ..Default::default()
            },
        ]
    }

    #[test]
    fn every_format_reads_back_as_the_same_rows() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let mut read_back = Vec::new();
        for (format, name) in [
            (FileFormat::Jsonl, "rows.jsonl"),
            (FileFormat::Csv, "rows.csv"),
            (FileFormat::Parquet, "rows.parquet"),
        ] {
            let options = GenerateOptions {
                path: directory.path().join(name),
                format,
                users: 50,
                first_user: 1000,
                seed: 7,
                source: "ai_chat".to_string(),
                surfaces: vec!["facebook_feed".to_string()],
                features: Vec::new(),
                producer: "generator@test".to_string(),
                origin_app: None,
                now_unix_micros: 1_800_000_000_000_000,
            };
            assert_eq!(generate(&options, &registry()).expect("generated"), 50);
            let mut source = open(&options.path, format, &registry(), None).expect("opens");
            let mut items = Vec::new();
            while source.read(7, &mut items).expect("reads") {}
            let rows: Vec<proto::WriteRow> = items
                .into_iter()
                .map(|item| match item {
                    Item::Row { row, .. } => row,
                    Item::Bad { line, problem } => panic!("{name} line {line}: {problem}"),
                })
                .collect();
            assert_eq!(rows.len(), 50, "{name}");
            assert_eq!(rows[0].user_id, 1000);
            assert_eq!(rows[0].features.len(), 3);
            read_back.push(rows);
        }
        assert_eq!(read_back[0], read_back[1], "CSV reads as JSON Lines does");
        assert_eq!(
            read_back[0], read_back[2],
            "Parquet reads as JSON Lines does"
        );
    }
}
