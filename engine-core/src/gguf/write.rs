//! Writing a GGUF (version 3) file: metadata keys and tensors, the tensors' bytes streamed so that
//! a model of gigabytes never has to be held. The project makes its own models with it (no weights
//! can be downloaded): the tiny model, the LLaVA-shaped model, the tests' placeholder files.
//!
//! Layout: header, key/values, tensor infos, padding to the alignment, tensor data (each aligned).

use std::io::{self, Write};

/// Tensor data starts on a multiple of this.
const ALIGNMENT: u64 = 32;

use super::value_type::{
    ARRAY as T_ARRAY, BOOL as T_BOOL, F32 as T_FLOAT32, I32 as T_INT32, STRING as T_STRING,
    U32 as T_UINT32,
};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string`.
    Str(String),
    /// An array of strings.
    ArrStr(Vec<String>),
    /// An array of `int32`.
    ArrI32(Vec<i32>),
    /// An array of `float32`.
    ArrF32(Vec<f32>),
}

/// How a tensor's elements are stored (ggml's type ids and block sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    /// 4 bytes an element.
    F32,
    /// 2 bytes an element.
    F16,
    /// Blocks of 256 elements in 144 bytes (4.5 bits an element).
    Q4K,
    /// Blocks of 256 elements in 210 bytes (6.56 bits an element).
    Q6K,
}

impl TensorType {
    /// ggml's id for the type.
    pub fn id(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q4K => 12,
            TensorType::Q6K => 14,
        }
    }

    /// Elements per block, and bytes per block.
    pub fn block(self) -> (u64, u64) {
        match self {
            TensorType::F32 => (1, 4),
            TensorType::F16 => (1, 2),
            TensorType::Q4K => (256, 144),
            TensorType::Q6K => (256, 210),
        }
    }

    /// The bytes `elements` take; `None` if they do not fill whole blocks.
    pub fn bytes(self, elements: u64) -> Option<u64> {
        let (per_block, size) = self.block();
        elements
            .is_multiple_of(per_block)
            .then(|| elements / per_block * size)
    }
}

/// Writes a tensor's bytes, exactly as many as its type and shape take.
pub type Fill = Box<dyn FnMut(&mut dyn Write) -> io::Result<()>>;

struct Tensor {
    name: String,
    shape: Vec<u64>,
    kind: TensorType,
    bytes: u64,
    fill: Fill,
}

/// A GGUF file under construction.
///
/// ```
/// use engine_core::gguf::{Gguf, Value, read_architecture};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("m.gguf");
/// let mut file = Gguf::default();
/// file.kv("general.architecture", Value::Str("llama".into()));
/// file.tensor_f32("w", &[2, 2], vec![1.0, 0.0, 0.0, 1.0]);
/// file.write(&mut std::fs::File::create(&path)?)?;
/// assert_eq!(read_architecture(&path).unwrap().as_deref(), Some("llama"));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Default)]
pub struct Gguf {
    version: Option<u32>,
    kv: Vec<(String, Value)>,
    tensors: Vec<Tensor>,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tensors: Vec<&str> = self.tensors.iter().map(|t| t.name.as_str()).collect();
        f.debug_struct("Gguf")
            .field("kv", &self.kv)
            .field("tensors", &tensors)
            .finish()
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(head: &mut Vec<u8>, value: &Value) {
    let array = |head: &mut Vec<u8>, kind: u32, len: usize| {
        head.extend_from_slice(&T_ARRAY.to_le_bytes());
        head.extend_from_slice(&kind.to_le_bytes());
        head.extend_from_slice(&(len as u64).to_le_bytes());
    };
    match value {
        Value::U32(v) => {
            head.extend_from_slice(&T_UINT32.to_le_bytes());
            head.extend_from_slice(&v.to_le_bytes());
        }
        Value::I32(v) => {
            head.extend_from_slice(&T_INT32.to_le_bytes());
            head.extend_from_slice(&v.to_le_bytes());
        }
        Value::F32(v) => {
            head.extend_from_slice(&T_FLOAT32.to_le_bytes());
            head.extend_from_slice(&v.to_le_bytes());
        }
        Value::Bool(v) => {
            head.extend_from_slice(&T_BOOL.to_le_bytes());
            head.push(u8::from(*v));
        }
        Value::Str(v) => {
            head.extend_from_slice(&T_STRING.to_le_bytes());
            write_str(head, v);
        }
        Value::ArrStr(items) => {
            array(head, T_STRING, items.len());
            for item in items {
                write_str(head, item);
            }
        }
        Value::ArrI32(items) => {
            array(head, T_INT32, items.len());
            for item in items {
                head.extend_from_slice(&item.to_le_bytes());
            }
        }
        Value::ArrF32(items) => {
            array(head, T_FLOAT32, items.len());
            for item in items {
                head.extend_from_slice(&item.to_le_bytes());
            }
        }
    }
}

impl Gguf {
    /// Writes this GGUF version in the header instead of 3 (2 has the same layout): for tests of
    /// readers.
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = Some(version);
        self
    }

    /// Adds a metadata key.
    pub fn kv(&mut self, key: &str, value: Value) -> &mut Self {
        self.kv.push((key.to_string(), value));
        self
    }

    /// Adds an F32 tensor held in memory. `shape` is in ggml order (`shape[0]` is the row length).
    ///
    /// # Panics
    /// If the shape and the data disagree (a bug of the caller's).
    pub fn tensor_f32(&mut self, name: &str, shape: &[u64], data: Vec<f32>) -> &mut Self {
        let elements: u64 = shape.iter().product();
        assert_eq!(
            elements as usize,
            data.len(),
            "tensor {name}: shape and data disagree"
        );
        let fill: Fill = Box::new(move |out: &mut dyn Write| {
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            out.write_all(&bytes)
        });
        self.push(name, shape, TensorType::F32, fill)
    }

    /// Adds a tensor of `kind` whose bytes `fill` writes when the file is written (exactly as many
    /// as the type and shape take: the writer checks).
    ///
    /// # Panics
    /// If the shape does not fill whole blocks of `kind` (a bug of the caller's).
    pub fn tensor_with(
        &mut self,
        name: &str,
        shape: &[u64],
        kind: TensorType,
        fill: Fill,
    ) -> &mut Self {
        self.push(name, shape, kind, fill)
    }

    fn push(&mut self, name: &str, shape: &[u64], kind: TensorType, fill: Fill) -> &mut Self {
        let elements: u64 = shape.iter().product();
        let bytes = kind
            .bytes(elements)
            .unwrap_or_else(|| panic!("tensor {name}: {shape:?} is not whole blocks of {kind:?}"));
        self.tensors.push(Tensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            kind,
            bytes,
            fill,
        });
        self
    }

    /// The bytes the file will take.
    pub fn size(&self) -> u64 {
        self.head().len() as u64
            + self
                .tensors
                .iter()
                .map(|t| t.bytes.next_multiple_of(ALIGNMENT))
                .sum::<u64>()
    }

    fn head(&self) -> Vec<u8> {
        let mut head = Vec::new();
        head.extend_from_slice(b"GGUF");
        head.extend_from_slice(&self.version.unwrap_or(3).to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (key, value) in &self.kv {
            write_str(&mut head, key);
            write_value(&mut head, value);
        }
        let mut offset = 0u64;
        for tensor in &self.tensors {
            write_str(&mut head, &tensor.name);
            head.extend_from_slice(&(tensor.shape.len() as u32).to_le_bytes());
            for dim in &tensor.shape {
                head.extend_from_slice(&dim.to_le_bytes());
            }
            head.extend_from_slice(&tensor.kind.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += tensor.bytes.next_multiple_of(ALIGNMENT);
        }
        if !self.tensors.is_empty() {
            head.resize((head.len() as u64).next_multiple_of(ALIGNMENT) as usize, 0);
        }
        head
    }

    /// Writes the file, consuming the tensors' fills.
    pub fn write(&mut self, out: &mut impl Write) -> io::Result<()> {
        out.write_all(&self.head())?;
        for tensor in &mut self.tensors {
            let mut counted = Counted { out, written: 0 };
            (tensor.fill)(&mut counted)?;
            if counted.written != tensor.bytes {
                return Err(io::Error::other(format!(
                    "tensor {}: {} bytes written, its type and shape take {}",
                    tensor.name, counted.written, tensor.bytes
                )));
            }
            let pad = tensor.bytes.next_multiple_of(ALIGNMENT) - tensor.bytes;
            out.write_all(&vec![0; pad as usize])?;
        }
        Ok(())
    }
}

/// Counts what a fill writes.
struct Counted<'a, W: Write> {
    out: &'a mut W,
    written: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let n = self.out.write(bytes)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fill_of_the_wrong_length_is_an_error() {
        let mut file = Gguf::default();
        file.tensor_with(
            "q",
            &[256, 2],
            TensorType::Q4K,
            Box::new(|out| out.write_all(&[0; 10])),
        );
        let err = file.write(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("288"), "{err}");
    }

    #[test]
    fn the_size_is_what_is_written() {
        let mut file = Gguf::default();
        file.kv("k", Value::Str("v".into()));
        file.tensor_f32("a", &[3], vec![1.0, 2.0, 3.0]);
        file.tensor_with(
            "q",
            &[256],
            TensorType::Q6K,
            Box::new(|out| out.write_all(&[0; 210])),
        );
        let size = file.size();
        let mut bytes = Vec::new();
        file.write(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, size);
    }
}
