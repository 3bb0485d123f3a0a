//! PostgreSQL type OIDs the masker must tell apart (from `pg_type.dat`; built-in OIDs are stable).

pub const BOOL: u32 = 16;
pub const BYTEA: u32 = 17;
pub const CHAR: u32 = 18;
pub const NAME: u32 = 19;
pub const INT8: u32 = 20;
pub const INT2: u32 = 21;
pub const INT4: u32 = 23;
pub const TEXT: u32 = 25;
pub const OID: u32 = 26;
pub const JSON: u32 = 114;
pub const XML: u32 = 142;
pub const FLOAT4: u32 = 700;
pub const FLOAT8: u32 = 701;
pub const UNKNOWN: u32 = 705;
pub const MONEY: u32 = 790;
pub const MACADDR: u32 = 829;
pub const MACADDR8: u32 = 774;
pub const CIDR: u32 = 650;
pub const INET: u32 = 869;
pub const BPCHAR: u32 = 1042;
pub const VARCHAR: u32 = 1043;
pub const DATE: u32 = 1082;
pub const TIME: u32 = 1083;
pub const TIMESTAMP: u32 = 1114;
pub const TIMESTAMPTZ: u32 = 1184;
pub const INTERVAL: u32 = 1186;
pub const TIMETZ: u32 = 1266;
pub const NUMERIC: u32 = 1700;
pub const RECORD: u32 = 2249;
pub const UUID: u32 = 2950;
pub const TSVECTOR: u32 = 3614;
pub const JSONB: u32 = 3802;
pub const JSONPATH: u32 = 4072;

/// User-defined types (enums, domains, composites, extension types such as citext or hstore) get OIDs
/// from here on (`FirstNormalObjectId`).
const FIRST_NORMAL_OID: u32 = 16384;

/// How the masker treats a column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ValueKind {
    /// Text in both formats (the binary form of these types is the text itself).
    Text,
    /// json; jsonb in text format.
    Json,
    /// jsonb in binary format: a version byte (1) then the text.
    JsonbBinary,
    /// A value that may embed text but whose layout we do not rewrite: arrays of text-like types,
    /// records, tsvector, and user-defined types. Text format: scanned and rewritten as text (a
    /// replacement never contains syntax characters). Binary format: scanned, and NULL on a hit.
    Embedded {
        binary: bool,
    },
    /// int2/int4/int8 (width in bytes), numeric in text format, uuid: keyed hash can keep the type.
    Int {
        bytes: u8,
        binary: bool,
    },
    NumericText,
    Uuid {
        binary: bool,
    },
    /// Cannot hold free text (numbers, timestamps, inet, bytea, ...): detectors skip it.
    Opaque,
}

pub(crate) fn value_kind(type_oid: u32, binary: bool) -> ValueKind {
    match type_oid {
        TEXT | VARCHAR | BPCHAR | NAME | UNKNOWN | XML => ValueKind::Text,
        JSON => ValueKind::Json,
        JSONB if binary => ValueKind::JsonbBinary,
        JSONB => ValueKind::Json,
        INT2 => ValueKind::Int { bytes: 2, binary },
        INT4 => ValueKind::Int { bytes: 4, binary },
        INT8 => ValueKind::Int { bytes: 8, binary },
        NUMERIC if !binary => ValueKind::NumericText,
        UUID => ValueKind::Uuid { binary },
        RECORD | TSVECTOR | JSONPATH | 1009 | 1015 | 1014 | 1003 | 199 | 3807 | 143 | 2287
        | 3643 => ValueKind::Embedded { binary },
        oid if oid >= FIRST_NORMAL_OID || oid == 0 => ValueKind::Embedded { binary },
        _ => ValueKind::Opaque,
    }
}

/// Type names accepted by `type = "..."` column rules.
const NAMES: &[(&str, u32)] = &[
    ("bool", BOOL),
    ("boolean", BOOL),
    ("bytea", BYTEA),
    ("char", CHAR),
    ("name", NAME),
    ("int8", INT8),
    ("bigint", INT8),
    ("int2", INT2),
    ("smallint", INT2),
    ("int4", INT4),
    ("int", INT4),
    ("integer", INT4),
    ("text", TEXT),
    ("oid", OID),
    ("json", JSON),
    ("xml", XML),
    ("float4", FLOAT4),
    ("real", FLOAT4),
    ("float8", FLOAT8),
    ("double precision", FLOAT8),
    ("money", MONEY),
    ("macaddr", MACADDR),
    ("macaddr8", MACADDR8),
    ("cidr", CIDR),
    ("inet", INET),
    ("bpchar", BPCHAR),
    ("character", BPCHAR),
    ("varchar", VARCHAR),
    ("character varying", VARCHAR),
    ("date", DATE),
    ("time", TIME),
    ("timestamp", TIMESTAMP),
    ("timestamptz", TIMESTAMPTZ),
    ("interval", INTERVAL),
    ("timetz", TIMETZ),
    ("numeric", NUMERIC),
    ("decimal", NUMERIC),
    ("uuid", UUID),
    ("tsvector", TSVECTOR),
    ("jsonb", JSONB),
];

pub(crate) fn oid_by_name(name: &str) -> Option<u32> {
    let name = name.trim().to_ascii_lowercase();
    NAMES.iter().find(|(n, _)| *n == name).map(|&(_, oid)| oid)
}

pub(crate) fn known_names() -> String {
    NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}
