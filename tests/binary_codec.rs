//! The cs.binary payload types against golden bytes from the reference's own cs.binary: every value encodes to its bytes, decodes back, and every cut of it fails naming the type and offset.
//!
//! The vectors in `tests/data/binary_vectors.json` were produced once by
//! `python/binary_vectors.py` with cs.binary 20240630 (the interop venv's
//! python; the script says how to rerun it). They hold 743 values of the
//! scalar and list types and two records of the `typed_service` example's
//! `Record`, encoded by the reference's `BinaryMultiValue`.

// Only the example's service types are used here, not its command line;
// its `pub` items are public to the example, not to this test.
#[allow(dead_code, unreachable_pub)]
#[path = "../examples/typed_service.rs"]
mod typed_service;

use std::collections::BTreeMap;
use std::fmt::Debug;

use packetstream::{
    BSData, BSSFloat, BSString, BSUInt, BinaryUTF8NUL, Error, Float64BE, Float64LE, Int16BE,
    Int16LE, Int32BE, Int32LE, Payload, PayloadReader, PayloadWrite, UInt16BE, UInt16LE, UInt32BE,
    UInt32LE, UInt64BE, UInt64LE, UInt8,
};
use serde_json::Value;

use typed_service::service::Record;

struct Vectors {
    vectors: Vec<Value>,
    records: Vec<Value>,
}

fn load() -> Vectors {
    let text = include_str!("data/binary_vectors.json");
    let mut all: BTreeMap<String, Value> = serde_json::from_str(text).expect("valid JSON");
    let mut take = |key: &str| match all.remove(key) {
        Some(Value::Array(items)) => items,
        other => panic!("{key}: expected an array, got {other:?}"),
    };
    Vectors {
        vectors: take("vectors"),
        records: take("records"),
    }
}

fn unhex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "odd hex {text:?}");
    (0..text.len())
        .step_by(2)
        .map(|idx| u8::from_str_radix(&text[idx..idx + 2], 16).expect("hex"))
        .collect()
}

fn float(value: &Value) -> f64 {
    let bits = unhex(value.as_str().expect("float bits as hex"));
    f64::from_be_bytes(bits.try_into().expect("8 bytes"))
}

fn uint<T: TryFrom<u64>>(value: &Value) -> T {
    let n = value.as_u64().expect("an unsigned integer");
    T::try_from(n).unwrap_or_else(|_| panic!("{n} out of range"))
}

fn int<T: TryFrom<i64>>(value: &Value) -> T {
    let n = value.as_i64().expect("an integer");
    T::try_from(n).unwrap_or_else(|_| panic!("{n} out of range"))
}

fn text(value: &Value) -> String {
    value.as_str().expect("a string").to_owned()
}

fn list<T>(value: &Value, item: impl Fn(&Value) -> T) -> Vec<T> {
    value.as_array().expect("a list").iter().map(item).collect()
}

fn decode_msg<T: Debug>(res: packetstream::Result<T>) -> String {
    match res {
        Err(Error::Decode(msg)) => msg,
        other => panic!("expected a decode error, got {other:?}"),
    }
}

/// `value` encodes to `wire`, `wire` decodes to a value that encodes to
/// `wire` again (NaN has no `==`), equal to `value` where `==` holds, and
/// every shorter cut of `wire` fails with a message that names `what` and
/// an offset. For a list, `what` is `"list"`: a cut fails in the list's
/// count (`"list count: ..."`) or in an item (`"item N: ..."`).
fn check<T: Payload + PartialEq + Debug>(what: &str, value: T, wire: &[u8]) {
    assert_eq!(value.to_bytes(), wire, "encoding {what} {value:?}");
    let back = T::from_bytes(wire).unwrap_or_else(|e| panic!("decoding {what} {wire:02x?}: {e}"));
    assert_eq!(back.to_bytes(), wire, "re-encoding {what} {back:?}");
    // A float NaN is the one value not equal to itself.
    #[allow(clippy::eq_op)]
    let comparable = value == value;
    if comparable {
        assert_eq!(back, value, "decoding {what}");
    }
    for cut in 0..wire.len() {
        let msg = decode_msg(T::from_bytes(&wire[..cut]));
        let named = msg.contains(what) || (what == "list" && msg.starts_with("item "));
        assert!(
            named && msg.contains("offset"),
            "{what} cut to {cut} of {} bytes: {msg}",
            wire.len()
        );
    }
}

#[test]
fn every_scalar_and_list_matches_the_reference_bytes() {
    let vectors = load().vectors;
    assert_eq!(vectors.len(), 743);
    let mut seen = BTreeMap::new();
    for vector in &vectors {
        let name = vector["type"].as_str().expect("a type name");
        let value = &vector["value"];
        let wire = unhex(vector["wire"].as_str().expect("wire as hex"));
        *seen.entry(name).or_insert(0) += 1;
        match name {
            "UInt8" => check(name, UInt8(uint(value)), &wire),
            "UInt16BE" => check(name, UInt16BE(uint(value)), &wire),
            "UInt16LE" => check(name, UInt16LE(uint(value)), &wire),
            "UInt32BE" => check(name, UInt32BE(uint(value)), &wire),
            "UInt32LE" => check(name, UInt32LE(uint(value)), &wire),
            "UInt64BE" => check(name, UInt64BE(uint(value)), &wire),
            "UInt64LE" => check(name, UInt64LE(uint(value)), &wire),
            "Int16BE" => check(name, Int16BE(int(value)), &wire),
            "Int16LE" => check(name, Int16LE(int(value)), &wire),
            "Int32BE" => check(name, Int32BE(int(value)), &wire),
            "Int32LE" => check(name, Int32LE(int(value)), &wire),
            "Float64BE" => check(name, Float64BE(float(value)), &wire),
            "Float64LE" => check(name, Float64LE(float(value)), &wire),
            "BSSFloat" => check(name, BSSFloat(float(value)), &wire),
            "BSUInt" => {
                check(name, BSUInt(uint(value)), &wire);
                check(name, uint::<u64>(value), &wire);
            }
            "BSData" => {
                let data = unhex(value.as_str().expect("hex"));
                check(name, BSData(data.clone()), &wire);
                check(name, data, &wire);
            }
            "BSString" => {
                check(name, BSString(text(value)), &wire);
                check(name, text(value), &wire);
            }
            "BinaryUTF8NUL" => {
                let value = BinaryUTF8NUL::new(text(value)).expect("no NUL");
                check(name, value, &wire);
            }
            // A list's cuts fail in its count or in an item.
            "list:Int32LE" => check("list", list(value, |v| Int32LE(int(v))), &wire),
            "list:UInt16BE" => check("list", list(value, |v| UInt16BE(uint(v))), &wire),
            "list:BSString" => check("list", list(value, |v| BSString(text(v))), &wire),
            "list:UInt8" => {
                check("list", list(value, |v| UInt8(uint(v))), &wire);
                // The same bytes as BSData.
                check("BSData", list(value, uint::<u8>), &wire);
            }
            other => panic!("no Rust type for {other}"),
        }
    }
    // Every type the table names has vectors.
    assert_eq!(seen.len(), 22, "{seen:?}");
}

#[test]
fn lists_of_plain_values_through_their_encoding_match_the_newtype_lists() {
    for vector in load().vectors {
        let wire = unhex(vector["wire"].as_str().unwrap());
        let value = &vector["value"];
        let mut out = Vec::new();
        match vector["type"].as_str().unwrap() {
            "list:Int32LE" => {
                let values: Vec<i32> = list(value, int);
                out.put_as::<Vec<Int32LE>, _>(&values);
                let mut r = PayloadReader::new(&wire);
                assert_eq!(r.read_as::<Vec<Int32LE>, Vec<i32>>().unwrap(), values);
                r.finish().unwrap();
            }
            "list:BSString" => {
                let values: Vec<String> = list(value, text);
                out.put_as::<Vec<BSString>, _>(&values);
                // A list of strings is also `Vec<String>`'s own encoding.
                assert_eq!(Vec::<String>::from_bytes(&wire).unwrap(), values);
            }
            _ => continue,
        }
        assert_eq!(out, wire);
    }
}

fn record(value: &Value) -> Record {
    Record {
        id: uint(&value["id"]),
        kind: uint(&value["kind"]),
        offset: int(&value["offset"]),
        delta: int(&value["delta"]),
        stamp: uint(&value["stamp"]),
        temperature: float(&value["temperature"]),
        ratio: float(&value["ratio"]),
        name: text(&value["name"]),
        label: BinaryUTF8NUL::new(text(&value["label"])).expect("no NUL"),
        blob: unhex(value["blob"].as_str().unwrap()),
        count: uint(&value["count"]),
        samples: list(&value["samples"], int),
    }
}

#[test]
fn records_match_the_reference_binary_multi_value_and_cuts_name_the_field() {
    let records = load().records;
    assert_eq!(records.len(), 2);
    let fields = [
        "id",
        "kind",
        "offset",
        "delta",
        "stamp",
        "temperature",
        "ratio",
        "name",
        "label",
        "blob",
        "count",
        "samples",
    ];
    for vector in records {
        let rec = record(&vector["value"]);
        let wire = unhex(vector["wire"].as_str().unwrap());
        assert_eq!(rec.to_bytes(), wire, "encoding {rec:?}");
        assert_eq!(Record::from_bytes(&wire).unwrap(), rec);
        let mut named = BTreeMap::new();
        for cut in 0..wire.len() {
            let msg = decode_msg(Record::from_bytes(&wire[..cut]));
            let field = fields
                .iter()
                .find(|field| msg.starts_with(&format!("{field}: ")))
                .unwrap_or_else(|| panic!("cut to {cut}: no field named in {msg:?}"));
            assert!(msg.contains("offset"), "{msg}");
            named.insert(*field, ());
        }
        // Every field is cut somewhere, and each cut names it.
        assert_eq!(named.len(), fields.len(), "{named:?}");
    }
}

#[test]
fn truncation_errors_name_type_field_and_offset_exactly() {
    let wire = unhex(load().records[1]["wire"].as_str().unwrap());
    // id (4) kind (1) offset (2) delta (4) stamp (8) temperature (8): the
    // ratio's BSString starts at offset 27.
    assert_eq!(
        decode_msg(Record::from_bytes(&wire[..2])),
        "id: truncated UInt32BE: needs 4 bytes at offset 0, 2 remain"
    );
    assert_eq!(
        decode_msg(Record::from_bytes(&wire[..15])),
        "stamp: truncated UInt64LE: needs 8 bytes at offset 11, 4 remain"
    );
    assert_eq!(
        decode_msg(Record::from_bytes(&wire[..27])),
        "ratio: BSSFloat length: truncated BSUInt at offset 27: input ends after 0 bytes"
    );
    assert_eq!(
        decode_msg(Record::from_bytes(&wire[..30])),
        "ratio: truncated BSSFloat: needs 5 bytes at offset 28, 2 remain"
    );
    // The samples end the record: a count of 3, then 3 Int32LE.
    let cut = wire.len() - 2;
    assert_eq!(
        decode_msg(Record::from_bytes(&wire[..cut])),
        format!(
            "samples: item 2: truncated Int32LE: needs 4 bytes at offset {}, 2 remain",
            wire.len() - 4
        )
    );
    // A count larger than the bytes that remain is refused before any item
    // is read.
    let mut huge = Vec::new();
    huge.put_bs_uint(1 << 40);
    huge.extend_from_slice(&[0; 8]);
    assert_eq!(
        decode_msg(Vec::<Int32LE>::from_bytes(&huge)),
        "list at offset 0 claims 1099511627776 items, but only 8 bytes remain"
    );
}

#[test]
fn bssfloat_reads_what_python_float_reads_and_writes_what_str_writes() {
    // Texts Python's float() reads that str(float) never writes.
    for (text, want) in [
        ("1e16", 1e16),
        (" 2.5 ", 2.5),
        ("1_000", 1000.0),
        ("-Infinity", f64::NEG_INFINITY),
        ("1E-5", 1e-5),
    ] {
        let mut wire = Vec::new();
        wire.put_bs_string(text);
        assert_eq!(
            BSSFloat::from_bytes(&wire).unwrap(),
            BSSFloat(want),
            "{text:?}"
        );
    }
    let mut wire = Vec::new();
    wire.put_bs_string("1__0");
    assert_eq!(
        decode_msg(BSSFloat::from_bytes(&wire)),
        "BSSFloat at offset 0 is not a float: \"1__0\""
    );
}
