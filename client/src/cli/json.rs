//! The JSON the commands read (rows to write) and print (rows read).

use super::data::type_name;
use super::*;

/// Builds a write request from the CLI's JSON format, typing each value by the registry.
pub(super) fn write_request_from_json(
    text: &str,
    features: &[proto::FeatureDefinition],
) -> anyhow::Result<proto::WriteFeaturesRequest> {
    let document: Json = serde_json::from_str(text).context("the input is not valid JSON")?;
    let (idempotency_key, rows) = match &document {
        Json::Array(rows) => (None, rows.as_slice()),
        Json::Object(object) if object.contains_key("rows") => (
            object
                .get("idempotency_key")
                .and_then(Json::as_str)
                .map(str::to_string),
            object["rows"]
                .as_array()
                .map(Vec::as_slice)
                .context("\"rows\" must be an array")?,
        ),
        Json::Object(_) => (None, std::slice::from_ref(&document)),
        _ => bail!("the input must be a row object, an array of rows, or {{\"rows\": [...]}}"),
    };
    let types: HashMap<&str, &proto::FeatureDefinition> = features
        .iter()
        .map(|feature| (feature.name.as_str(), feature))
        .collect();
    let rows = rows
        .iter()
        .enumerate()
        .map(|(index, row)| {
            write_row_from_json(row, &types).with_context(|| format!("rows[{index}]"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let idempotency_key = idempotency_key.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        format!("cli-{}-{nanos}", std::process::id())
    });
    Ok(proto::WriteFeaturesRequest {
        idempotency_key,
        rows,
    })
}

pub(super) fn write_row_from_json(
    row: &Json,
    types: &HashMap<&str, &proto::FeatureDefinition>,
) -> anyhow::Result<proto::WriteRow> {
    let row = row.as_object().context("a row must be an object")?;
    let text = |field: &str| -> anyhow::Result<String> {
        row.get(field)
            .and_then(Json::as_str)
            .map(str::to_string)
            .with_context(|| format!("\"{field}\" must be a string"))
    };
    let user_id = row
        .get("user_id")
        .and_then(Json::as_u64)
        .context("\"user_id\" must be a positive integer")?;
    let surfaces = row
        .get("surfaces")
        .and_then(Json::as_array)
        .context("\"surfaces\" must be an array of surface names")?
        .iter()
        .map(|surface| {
            surface
                .as_str()
                .map(str::to_string)
                .context("surface names are strings")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let interaction_time = match row.get("interaction_time") {
        None => SystemTime::now(),
        Some(Json::String(text)) => humantime::parse_rfc3339_weak(text)
            .with_context(|| format!("\"interaction_time\" {text:?} is not an RFC 3339 time"))?,
        Some(_) => {
            bail!("\"interaction_time\" must be an RFC 3339 time such as \"2026-01-05T10:00:00Z\"")
        }
    };
    let interaction_time_unix_micros = interaction_time
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|since| i64::try_from(since.as_micros()).ok())
        .context("\"interaction_time\" must be after 1970")?;
    let features = row
        .get("features")
        .and_then(Json::as_object)
        .context("\"features\" must be an object of name: value")?
        .iter()
        .map(|(name, value)| {
            feature_from_json(name, value, types).with_context(|| format!("feature {name:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(proto::WriteRow {
        user_id,
        target_surfaces: surfaces,
        provenance: Some(proto::Provenance {
            source: text("source")?,
            origin_app: text("origin_app")?,
            interaction_time_unix_micros,
            producer_id: row
                .get("producer_id")
                .and_then(Json::as_str)
                .unwrap_or("featurestore-cli")
                .to_string(),
            microphone_permission_granted: row
                .get("microphone_permission_granted")
                .and_then(Json::as_bool)
                .unwrap_or(false),
        }),
        features,
        user_state_generation: row
            .get("user_state_generation")
            .and_then(Json::as_u64)
            .unwrap_or(0),
    })
}

/// A feature is `name: value`, or `name: {"value": ..., "topic_id", "topic_confidence",
/// "ttl_seconds"}`.
pub(super) fn feature_from_json(
    name: &str,
    value: &Json,
    types: &HashMap<&str, &proto::FeatureDefinition>,
) -> anyhow::Result<proto::FeatureValue> {
    use proto::feature_value::Value as Wire;
    let definition = types
        .get(name)
        .with_context(|| "is not registered (see `featurestore features`)".to_string())?;
    let (value, details) = match value {
        Json::Object(object) if object.contains_key("value") => (&object["value"], Some(object)),
        other => (other, None),
    };
    let value_type =
        proto::ValueType::try_from(definition.value_type).unwrap_or(proto::ValueType::Unspecified);
    let as_f32 = |value: &Json| value.as_f64().map(|number| number as f32);
    let wire = match value_type {
        proto::ValueType::Float => as_f32(value).map(Wire::FloatValue),
        proto::ValueType::Int64 => value.as_i64().map(Wire::Int64Value),
        proto::ValueType::String => value
            .as_str()
            .map(|text| Wire::StringValue(text.to_string())),
        proto::ValueType::FloatVector => value
            .as_array()
            .and_then(|elements| elements.iter().map(as_f32).collect::<Option<Vec<_>>>())
            .map(|values| Wire::VectorValue(proto::FloatVector { values })),
        proto::ValueType::Sparse => value
            .as_object()
            .and_then(|entries| {
                entries
                    .iter()
                    .map(|(topic, weight)| as_f32(weight).map(|weight| (topic.clone(), weight)))
                    .collect::<Option<Vec<_>>>()
            })
            .map(|entries| {
                let (topics, weights) = entries.into_iter().unzip();
                Wire::SparseValue(proto::SparseVector { topics, weights })
            }),
        proto::ValueType::Unspecified => None,
    }
    .with_context(|| {
        format!(
            "the value is not a {}",
            type_name(definition.value_type, definition.dimension)
        )
    })?;
    let detail = |field: &str| details.and_then(|object: &Map<String, Json>| object.get(field));
    Ok(proto::FeatureValue {
        name: name.to_string(),
        value: Some(wire),
        topic_id: detail("topic_id")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_string(),
        topic_confidence: detail("topic_confidence").and_then(as_f32),
        ttl_seconds: detail("ttl_seconds").and_then(Json::as_u64).unwrap_or(0),
    })
}

/// A float as JSON, printed with the shortest digits that read back as the same `f32`.
pub(super) fn float_json(number: f32) -> Json {
    number
        .to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Json::Null, Json::Number)
}

/// The response as JSON objects, one per key.
pub(super) fn read_rows_json(keys: &[ReadKey], response: &proto::GetFeaturesResponse) -> Vec<Json> {
    keys.iter()
        .zip(&response.rows)
        .map(|(key, row)| {
            let status = proto::RowStatus::try_from(row.status)
                .map_or("?".to_string(), |status| enum_name(status.as_str_name(), "ROW_STATUS_"));
            let mut features = Map::new();
            for (index, column) in response.columns.iter().enumerate() {
                let Some(&value_status) = row.statuses.get(index) else { continue };
                let value_status = proto::ValueStatus::try_from(value_status)
                    .map_or("?".to_string(), |status| enum_name(status.as_str_name(), "VALUE_STATUS_"));
                let mut cell = Map::new();
                cell.insert("status".to_string(), json!(value_status));
                if value_status == "present" || value_status == "defaulted" {
                    cell.insert("value".to_string(), cell_value(column, row));
                }
                if let Some(&event_time) = row.event_times_unix_micros.get(index).filter(|&&time| time != 0) {
                    cell.insert("event_time".to_string(), json!(format_time(event_time)));
                }
                features.insert(column.name.clone(), Json::Object(cell));
            }
            json!({"user_id": key.user_id, "surface": key.surface, "status": status, "features": features})
        })
        .collect()
}

pub(super) fn cell_value(column: &proto::FeatureColumn, row: &proto::FeatureRow) -> Json {
    let offset = column.offset as usize;
    match proto::ValueType::try_from(column.value_type) {
        Ok(proto::ValueType::Float) => row
            .float_values
            .get(offset)
            .map_or(Json::Null, |&number| float_json(number)),
        Ok(proto::ValueType::FloatVector) => row
            .float_values
            .get(offset..offset + column.dimension as usize)
            .map_or(Json::Null, |elements| {
                elements.iter().map(|&number| float_json(number)).collect()
            }),
        Ok(proto::ValueType::Int64) => json!(row.int64_values.get(offset)),
        Ok(proto::ValueType::String) => json!(row.string_values.get(offset)),
        Ok(proto::ValueType::Sparse) => {
            row.sparse_values.get(offset).map_or(Json::Null, |sparse| {
                Json::Object(
                    sparse
                        .topics
                        .iter()
                        .zip(&sparse.weights)
                        .map(|(topic, weight)| (topic.clone(), float_json(*weight)))
                        .collect(),
                )
            })
        }
        Ok(proto::ValueType::Unspecified) | Err(_) => Json::Null,
    }
}
