//! Metadata values: the thirteen GGUF value types and their conversions.

use std::fmt;

/// A metadata value.
///
/// Arrays hold their elements as `Value`s; GGUF requires every element of one
/// array to have the same type (the writer checks this, the reader can only
/// produce homogeneous arrays).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 12.
    F64(f64),
    /// GGUF type 7 (one byte, 0 or 1).
    Bool(bool),
    /// GGUF type 8 (u64 byte length + UTF-8 bytes).
    String(String),
    /// GGUF type 9 (u32 element type + u64 count + elements).
    Array(Vec<Value>),
}

/// The type tag of a metadata value, with its GGUF id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ValueType {
    /// `u8`, id 0.
    U8 = 0,
    /// `i8`, id 1.
    I8 = 1,
    /// `u16`, id 2.
    U16 = 2,
    /// `i16`, id 3.
    I16 = 3,
    /// `u32`, id 4.
    U32 = 4,
    /// `i32`, id 5.
    I32 = 5,
    /// `f32`, id 6.
    F32 = 6,
    /// `bool`, id 7.
    Bool = 7,
    /// `string`, id 8.
    String = 8,
    /// `array`, id 9.
    Array = 9,
    /// `u64`, id 10.
    U64 = 10,
    /// `i64`, id 11.
    I64 = 11,
    /// `f64`, id 12.
    F64 = 12,
}

impl ValueType {
    /// The type for a GGUF value-type id, or `None` for an unknown id.
    pub fn from_u32(id: u32) -> Option<ValueType> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// The GGUF id written in files.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Short lowercase name: `"u32"`, `"string"`, `"array"`, …
    pub fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "u8",
            ValueType::I8 => "i8",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::Bool => "bool",
            ValueType::String => "string",
            ValueType::Array => "array",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type occupies in a file
    /// (a string is at least its u64 length; an array its type and count).
    /// Counts read from a file are bounded by `remaining / min_size()`.
    pub fn min_size(self) -> usize {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Value {
    /// The value's type tag.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F32(_) => ValueType::F32,
            Value::F64(_) => ValueType::F64,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
        }
    }

    /// Short lowercase type name (`"u32"`, `"string"`, `"array"`, …), for messages.
    pub fn type_name(&self) -> &'static str {
        self.value_type().name()
    }

    /// The string, if this is a [`Value::String`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer type holding a non-negative value, as `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits in `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// An `f32` or `f64` (rounded to `f32`), or any integer (converted, possibly
    /// rounded): hyper-parameters such as `rope.freq_base` are written either way.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => self
                .as_i64()
                .map(|v| v as f32)
                .or_else(|| self.as_u64().map(|v| v as f32)),
        }
    }

    /// The flag, if this is a [`Value::Bool`].
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if this is a [`Value::Array`].
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Longest string shown in full by `Display`; longer ones are cut with `…`.
const DISPLAY_STR_MAX: usize = 64;

/// Short form for listings: numbers as written, strings quoted and escaped
/// (cut after 64 characters), arrays as `[len × elemtype]`, e.g. `[49152 × string]`
/// (`[0 × ?]` when empty, since the element type is not kept).
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::String(s) => {
                f.write_str("\"")?;
                let mut chars = s.chars();
                for c in chars.by_ref().take(DISPLAY_STR_MAX) {
                    write!(f, "{}", c.escape_debug())?;
                }
                f.write_str("\"")?;
                if chars.next().is_some() {
                    f.write_str("…")?;
                }
                Ok(())
            }
            Value::Array(a) => {
                let elem = a.first().map_or("?", Value::type_name);
                write!(f, "[{} × {elem}]", a.len())
            }
        }
    }
}
