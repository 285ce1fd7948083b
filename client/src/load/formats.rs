//! Readers of backfill files: JSON Lines, CSV and Parquet, each turning records into write
//! rows with the shared [`Layout`], and malformed records into numbered problems.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{Context, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type,
    UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use featurestore::proto;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::layout::{Cell, Layout, Record};

/// The formats the loader reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FileFormat {
    Jsonl,
    Csv,
    Parquet,
}

impl FileFormat {
    /// The format a file name's extension says.
    pub fn of_path(path: &Path) -> Option<FileFormat> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "jsonl" | "ndjson" | "json" => Some(FileFormat::Jsonl),
            "csv" => Some(FileFormat::Csv),
            "parquet" | "pq" => Some(FileFormat::Parquet),
            _ => None,
        }
    }
}

/// What one record of a file became. `line` is the line number in text formats (the
/// header is line 1 in CSV) and the row number, from 1, in Parquet.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Row { line: u64, row: proto::WriteRow },
    Bad { line: u64, problem: String },
}

/// A file being read.
pub trait Source: Send {
    /// Appends up to `max` items; returns false once the file is exhausted.
    fn read(&mut self, max: usize, items: &mut Vec<Item>) -> anyhow::Result<bool>;
    /// Progress as (done, total) in [`Source::unit`]s.
    fn progress(&self) -> (u64, u64);
    /// "bytes" or "rows".
    fn unit(&self) -> &'static str;
}

/// Opens `path` in `format` for the registered `features`.
pub fn open(
    path: &Path,
    format: FileFormat,
    features: &[proto::FeatureDefinition],
    producer: Option<&str>,
) -> anyhow::Result<Box<dyn Source>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let total = file.metadata()?.len();
    Ok(match format {
        FileFormat::Jsonl => {
            let columns = Layout::known_columns(features);
            // Every known name is a column, so a missing producer is checked per line.
            let layout = Layout::new(&columns, features, producer)?;
            Box::new(JsonLines {
                reader: BufReader::with_capacity(1 << 20, file),
                index: columns
                    .iter()
                    .enumerate()
                    .map(|(index, name)| (name.clone(), index))
                    .collect(),
                columns: columns.len(),
                layout,
                producer: producer.map(str::to_string),
                line: 0,
                done: 0,
                total,
                buffer: String::new(),
            })
        }
        FileFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .buffer_capacity(1 << 20)
                .from_reader(file);
            let header: Vec<String> = reader
                .headers()
                .context("cannot read the CSV header")?
                .iter()
                .map(str::to_string)
                .collect();
            let layout = Layout::new(&header, features, producer)
                .context("the CSV header does not fit the registry")?;
            Box::new(Csv {
                reader,
                layout,
                record: csv::StringRecord::new(),
                total,
            })
        }
        FileFormat::Parquet => {
            let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                .with_context(|| format!("{} is not a Parquet file", path.display()))?;
            let total = u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0);
            let header: Vec<String> = builder
                .schema()
                .fields()
                .iter()
                .map(|field| field.name().clone())
                .collect();
            let layout = Layout::new(&header, features, producer)
                .context("the Parquet schema does not fit the registry")?;
            let reader = builder.with_batch_size(8192).build()?;
            Box::new(Parquet {
                reader,
                layout,
                batch: None,
                next_row: 0,
                done: 0,
                total,
            })
        }
    })
}

struct JsonLines {
    reader: BufReader<File>,
    index: HashMap<String, usize>,
    columns: usize,
    layout: Layout,
    producer: Option<String>,
    line: u64,
    done: u64,
    total: u64,
    buffer: String,
}

struct JsonRecord<'a> {
    cells: Vec<Option<&'a serde_json::Value>>,
}

impl Record for JsonRecord<'_> {
    fn cell(&self, column: usize) -> Cell<'_> {
        match self.cells[column] {
            Some(value) => Cell::Json(value),
            None => Cell::Null,
        }
    }
}

impl JsonLines {
    fn item(&self, text: &str) -> Result<proto::WriteRow, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|error| format!("not JSON: {error}"))?;
        let object = value
            .as_object()
            .ok_or_else(|| "not a JSON object".to_string())?;
        let mut cells = vec![None; self.columns];
        for (key, value) in object {
            let column = self.index.get(key).ok_or_else(|| {
                format!("{key:?} is neither a row field nor a registered feature")
            })?;
            cells[*column] = Some(value);
        }
        let has_producer = object
            .get(super::layout::PRODUCER_ID)
            .is_some_and(|value| !value.is_null());
        if !has_producer && self.producer.is_none() {
            return Err(format!(
                "no {:?}: give one in the line or with --producer",
                super::layout::PRODUCER_ID
            ));
        }
        self.layout.row(&JsonRecord { cells })
    }
}

impl Source for JsonLines {
    fn read(&mut self, max: usize, items: &mut Vec<Item>) -> anyhow::Result<bool> {
        let mut read = 0;
        while read < max {
            self.buffer.clear();
            let bytes = self.reader.read_line(&mut self.buffer)?;
            if bytes == 0 {
                return Ok(false);
            }
            self.line += 1;
            self.done += bytes as u64;
            let text = self.buffer.trim();
            if text.is_empty() {
                continue;
            }
            read += 1;
            items.push(match self.item(text) {
                Ok(row) => Item::Row {
                    line: self.line,
                    row,
                },
                Err(problem) => Item::Bad {
                    line: self.line,
                    problem,
                },
            });
        }
        Ok(true)
    }

    fn progress(&self) -> (u64, u64) {
        (self.done, self.total)
    }

    fn unit(&self) -> &'static str {
        "bytes"
    }
}

struct Csv {
    reader: csv::Reader<File>,
    layout: Layout,
    record: csv::StringRecord,
    total: u64,
}

struct CsvRecord<'a>(&'a csv::StringRecord);

impl Record for CsvRecord<'_> {
    fn cell(&self, column: usize) -> Cell<'_> {
        self.0.get(column).map_or(Cell::Null, Cell::Text)
    }
}

impl Source for Csv {
    fn read(&mut self, max: usize, items: &mut Vec<Item>) -> anyhow::Result<bool> {
        for _ in 0..max {
            match self.reader.read_record(&mut self.record) {
                Ok(false) => return Ok(false),
                Ok(true) => {
                    let line = self.record.position().map_or(0, csv::Position::line);
                    items.push(match self.layout.row(&CsvRecord(&self.record)) {
                        Ok(row) => Item::Row { line, row },
                        Err(problem) => Item::Bad { line, problem },
                    });
                }
                Err(error) => {
                    let line = error.position().map_or(0, csv::Position::line);
                    match error.kind() {
                        csv::ErrorKind::Io(_) => bail!("cannot read the CSV file: {error}"),
                        _ => items.push(Item::Bad {
                            line,
                            problem: error.to_string(),
                        }),
                    }
                }
            }
        }
        Ok(true)
    }

    fn progress(&self) -> (u64, u64) {
        (self.reader.position().byte(), self.total)
    }

    fn unit(&self) -> &'static str {
        "bytes"
    }
}

struct Parquet {
    reader: ParquetRecordBatchReader,
    layout: Layout,
    batch: Option<RecordBatch>,
    next_row: usize,
    done: u64,
    total: u64,
}

struct ParquetRecord<'a> {
    columns: &'a [ArrayRef],
    row: usize,
}

impl Record for ParquetRecord<'_> {
    fn cell(&self, column: usize) -> Cell<'_> {
        arrow_cell(self.columns[column].as_ref(), self.row)
    }
}

/// The cell of `array` at `row`, for the types a backfill file uses.
fn arrow_cell(array: &dyn Array, row: usize) -> Cell<'_> {
    if array.is_null(row) {
        return Cell::Null;
    }
    match array.data_type() {
        DataType::Int8 => Cell::Int(array.as_primitive::<Int8Type>().value(row).into()),
        DataType::Int16 => Cell::Int(array.as_primitive::<Int16Type>().value(row).into()),
        DataType::Int32 => Cell::Int(array.as_primitive::<Int32Type>().value(row).into()),
        DataType::Int64 => Cell::Int(array.as_primitive::<Int64Type>().value(row)),
        DataType::UInt8 => Cell::UInt(array.as_primitive::<UInt8Type>().value(row).into()),
        DataType::UInt16 => Cell::UInt(array.as_primitive::<UInt16Type>().value(row).into()),
        DataType::UInt32 => Cell::UInt(array.as_primitive::<UInt32Type>().value(row).into()),
        DataType::UInt64 => Cell::UInt(array.as_primitive::<UInt64Type>().value(row)),
        DataType::Float32 => Cell::Float(array.as_primitive::<Float32Type>().value(row).into()),
        DataType::Float64 => Cell::Float(array.as_primitive::<Float64Type>().value(row)),
        DataType::Boolean => Cell::Bool(array.as_boolean().value(row)),
        DataType::Utf8 => Cell::Text(array.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Cell::Text(array.as_string::<i64>().value(row)),
        DataType::Utf8View => Cell::Text(array.as_string_view().value(row)),
        DataType::List(_) => list_cell(array.as_list::<i32>().value(row).as_ref()),
        DataType::LargeList(_) => list_cell(array.as_list::<i64>().value(row).as_ref()),
        DataType::FixedSizeList(_, _) => list_cell(array.as_fixed_size_list().value(row).as_ref()),
        _ => Cell::Null,
    }
}

fn list_cell(items: &dyn Array) -> Cell<'static> {
    let count = items.len();
    match items.data_type() {
        DataType::Float32 => {
            let items = items.as_primitive::<Float32Type>();
            Cell::Floats((0..count).map(|index| items.value(index)).collect())
        }
        DataType::Float64 => {
            let items = items.as_primitive::<Float64Type>();
            Cell::Floats((0..count).map(|index| items.value(index) as f32).collect())
        }
        DataType::Utf8 => {
            let items = items.as_string::<i32>();
            Cell::Texts(
                (0..count)
                    .map(|index| items.value(index).to_string())
                    .collect(),
            )
        }
        DataType::LargeUtf8 => {
            let items = items.as_string::<i64>();
            Cell::Texts(
                (0..count)
                    .map(|index| items.value(index).to_string())
                    .collect(),
            )
        }
        _ => Cell::Null,
    }
}

impl Source for Parquet {
    fn read(&mut self, max: usize, items: &mut Vec<Item>) -> anyhow::Result<bool> {
        let mut read = 0;
        while read < max {
            let exhausted = self
                .batch
                .as_ref()
                .is_none_or(|batch| self.next_row >= batch.num_rows());
            if exhausted {
                match self.reader.next() {
                    Some(batch) => {
                        self.batch = Some(batch.context("cannot decode the Parquet file")?);
                        self.next_row = 0;
                        continue;
                    }
                    None => return Ok(false),
                }
            }
            let batch = self.batch.as_ref().expect("a batch is loaded above");
            let end = batch.num_rows().min(self.next_row + (max - read));
            for row in self.next_row..end {
                self.done += 1;
                let record = ParquetRecord {
                    columns: batch.columns(),
                    row,
                };
                items.push(match self.layout.row(&record) {
                    Ok(row) => Item::Row {
                        line: self.done,
                        row,
                    },
                    Err(problem) => Item::Bad {
                        line: self.done,
                        problem,
                    },
                });
            }
            read += end - self.next_row;
            self.next_row = end;
        }
        Ok(true)
    }

    fn progress(&self) -> (u64, u64) {
        (self.done, self.total)
    }

    fn unit(&self) -> &'static str {
        "rows"
    }
}
