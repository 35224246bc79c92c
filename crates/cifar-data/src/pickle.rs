//! A focused reader for CIFAR-10 python batch files.
//!
//! Those files are pickled dicts whose `data` entry is a numpy `uint8` array. A numpy array is
//! not plain data in a pickle: it is a call to `numpy.core.multiarray._reconstruct` followed by a
//! `BUILD` with the state tuple `(version, shape, dtype, is_fortran, raw_bytes)` (protocols 0–4),
//! or, with protocol 5, a call to `numpy.core.numeric._frombuffer(buffer, dtype, shape, order)`.
//! General-purpose pickle crates either reject those calls or discard their arguments, so this
//! module runs a small pickle machine that keeps calls symbolic (`Object { callable, args,
//! state }`) and then recognises exactly the numpy structures above. It never executes anything.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

/// A decoded pickle value; calls stay symbolic.
#[derive(Debug, Clone)]
pub(crate) enum PyValue {
    None,
    Bool(bool),
    Int(i64),
    /// A float; CIFAR batches never need its value.
    Float,
    Bytes(Rc<Vec<u8>>),
    Str(Rc<str>),
    Tuple(Rc<Vec<PyValue>>),
    List(Rc<RefCell<Vec<PyValue>>>),
    Dict(Rc<RefCell<Vec<(PyValue, PyValue)>>>),
    Global {
        module: Rc<str>,
        name: Rc<str>,
    },
    Object(Rc<RefCell<PyObject>>),
}

/// The result of `callable(*args)`, with the state given by a later `BUILD`.
#[derive(Debug)]
pub(crate) struct PyObject {
    pub callable: PyValue,
    pub args: PyValue,
    pub state: Option<PyValue>,
}

impl PyValue {
    fn kind(&self) -> &'static str {
        match self {
            PyValue::None => "None",
            PyValue::Bool(_) => "bool",
            PyValue::Int(_) => "int",
            PyValue::Float => "float",
            PyValue::Bytes(_) => "bytes",
            PyValue::Str(_) => "str",
            PyValue::Tuple(_) => "tuple",
            PyValue::List(_) => "list",
            PyValue::Dict(_) => "dict",
            PyValue::Global { .. } => "global",
            PyValue::Object(_) => "object",
        }
    }

    /// Text of a `str` or (python 2 / `encoding="bytes"`) `bytes` value.
    fn as_text(&self) -> Option<String> {
        match self {
            PyValue::Str(s) => Some(s.to_string()),
            PyValue::Bytes(b) => std::str::from_utf8(b).ok().map(str::to_string),
            _ => None,
        }
    }

    fn items(&self) -> Option<Vec<PyValue>> {
        match self {
            PyValue::Tuple(t) => Some(t.as_ref().clone()),
            PyValue::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }
}

/// Decoding error: a message and the byte offset where it happened.
type PResult<T> = Result<T, String>;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<PyValue>,
    marks: Vec<Vec<PyValue>>,
    memo: HashMap<u32, PyValue>,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "unexpected end of file at byte {} (needed {n} more bytes)",
                    self.pos
                )
            })?;
        let slice = &self.data[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> PResult<usize> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]) as usize)
    }

    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> PResult<usize> {
        let b = self.take(8)?;
        let v = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        usize::try_from(v).map_err(|_| format!("length {v} too large at byte {}", self.pos))
    }

    fn line(&mut self) -> PResult<&'a [u8]> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("unterminated text line at byte {}", self.pos))?;
        let line = &rest[..n];
        self.pos += n + 1;
        Ok(line)
    }

    fn text_line(&mut self) -> PResult<String> {
        let at = self.pos;
        let line = self.line()?;
        String::from_utf8(line.to_vec()).map_err(|_| format!("non-UTF-8 text at byte {at}"))
    }

    fn pop(&mut self) -> PResult<PyValue> {
        self.stack
            .pop()
            .ok_or_else(|| format!("stack underflow at byte {}", self.pos))
    }

    fn pop_mark(&mut self) -> PResult<Vec<PyValue>> {
        let items = std::mem::take(&mut self.stack);
        self.stack = self
            .marks
            .pop()
            .ok_or_else(|| format!("missing MARK at byte {}", self.pos))?;
        Ok(items)
    }

    fn top_mut(&mut self) -> PResult<&mut PyValue> {
        let pos = self.pos;
        self.stack
            .last_mut()
            .ok_or_else(|| format!("stack underflow at byte {pos}"))
    }

    fn push_str(&mut self, bytes: &[u8]) -> PResult<()> {
        let s = std::str::from_utf8(bytes)
            .map_err(|_| format!("invalid UTF-8 string ending at byte {}", self.pos))?;
        self.stack.push(PyValue::Str(Rc::from(s)));
        Ok(())
    }

    fn memo_get(&self, key: u32) -> PResult<PyValue> {
        self.memo
            .get(&key)
            .cloned()
            .ok_or_else(|| format!("memo key {key} not defined (byte {})", self.pos))
    }

    fn memo_put(&mut self, key: u32) -> PResult<()> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| format!("stack underflow at byte {}", self.pos))?;
        self.memo.insert(key, v);
        Ok(())
    }

    fn set_items(&mut self, pairs: Vec<PyValue>) -> PResult<()> {
        if pairs.len() % 2 == 1 {
            return Err(format!("odd number of dict items at byte {}", self.pos));
        }
        let pos = self.pos;
        match self.top_mut()? {
            PyValue::Dict(d) => {
                let mut d = d.borrow_mut();
                let mut it = pairs.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            other => Err(format!(
                "SETITEM(S) on a {} at byte {pos}, expected dict",
                other.kind()
            )),
        }
    }

    fn append(&mut self, items: Vec<PyValue>) -> PResult<()> {
        let pos = self.pos;
        match self.top_mut()? {
            PyValue::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(format!(
                "APPEND(S) on a {} at byte {pos}, expected list",
                other.kind()
            )),
        }
    }

    fn reduce(&mut self, callable: PyValue, args: PyValue) -> PResult<PyValue> {
        // `_codecs.encode(text, "latin1")` is how python 3 writes `bytes` at protocols < 3,
        // which numpy's raw data takes when someone re-pickles CIFAR with protocol 2.
        if let PyValue::Global { module, name } = &callable {
            if &**module == "_codecs" && &**name == "encode" {
                if let Some(items) = args.items() {
                    if let (Some(PyValue::Str(text)), Some(enc)) = (items.first(), items.get(1)) {
                        let enc = enc.as_text().unwrap_or_default().to_ascii_lowercase();
                        if enc == "latin1" || enc == "latin-1" || enc == "iso-8859-1" {
                            let mut bytes = Vec::with_capacity(text.len());
                            for ch in text.chars() {
                                let code = ch as u32;
                                if code > 255 {
                                    return Err(format!(
                                        "latin1 text with code point {code} at byte {}",
                                        self.pos
                                    ));
                                }
                                bytes.push(code as u8);
                            }
                            return Ok(PyValue::Bytes(Rc::new(bytes)));
                        }
                    }
                }
            }
        }
        Ok(PyValue::Object(Rc::new(RefCell::new(PyObject {
            callable,
            args,
            state: None,
        }))))
    }

    fn run(mut self) -> PResult<PyValue> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("unsupported pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: only a length hint
                }
                b'.' => return self.pop(),
                b'(' => {
                    let outer = std::mem::take(&mut self.stack);
                    self.marks.push(outer);
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self
                        .stack
                        .last()
                        .cloned()
                        .ok_or_else(|| format!("stack underflow at byte {at}"))?;
                    self.stack.push(v);
                }
                b'N' => self.stack.push(PyValue::None),
                0x88 => self.stack.push(PyValue::Bool(true)),
                0x89 => self.stack.push(PyValue::Bool(false)),
                b'I' => {
                    let text = self.text_line()?;
                    let v = match text.as_str() {
                        "00" => PyValue::Bool(false),
                        "01" => PyValue::Bool(true),
                        t => PyValue::Int(
                            t.parse()
                                .map_err(|_| format!("bad INT {t:?} at byte {at}"))?,
                        ),
                    };
                    self.stack.push(v);
                }
                b'L' => {
                    let text = self.text_line()?;
                    let t = text.trim_end_matches('L');
                    let v = t
                        .parse()
                        .map_err(|_| format!("bad or too large LONG {text:?} at byte {at}"))?;
                    self.stack.push(PyValue::Int(v));
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(PyValue::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(PyValue::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(PyValue::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    if n > 8 {
                        return Err(format!("integer of {n} bytes too large at byte {at}"));
                    }
                    let b = self.take(n)?;
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(PyValue::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(PyValue::Float);
                }
                b'F' => {
                    let text = self.text_line()?;
                    text.parse::<f64>()
                        .map_err(|_| format!("bad FLOAT {text:?} at byte {at}"))?;
                    self.stack.push(PyValue::Float);
                }
                // python 2 `str` (BINSTRING / SHORT_BINSTRING) is raw bytes, like `encoding="bytes"`
                b'T' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(PyValue::Bytes(Rc::new(b)));
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(PyValue::Bytes(Rc::new(b)));
                }
                b'S' => {
                    let text = self.line()?;
                    let inner = text
                        .strip_prefix(b"'")
                        .and_then(|t| t.strip_suffix(b"'"))
                        .or_else(|| text.strip_prefix(b"\"").and_then(|t| t.strip_suffix(b"\"")))
                        .ok_or_else(|| format!("unquoted STRING at byte {at}"))?;
                    if inner.contains(&b'\\') {
                        return Err(format!(
                            "escaped protocol-0 STRING at byte {at} is not supported"
                        ));
                    }
                    self.stack.push(PyValue::Bytes(Rc::new(inner.to_vec())));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(PyValue::Bytes(Rc::new(b)));
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(PyValue::Bytes(Rc::new(b)));
                }
                0x8e | 0x96 => {
                    let n = self.u64()?;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(PyValue::Bytes(Rc::new(b)));
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?;
                    self.push_str(b)?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    self.push_str(b)?;
                }
                0x8d => {
                    let n = self.u64()?;
                    let b = self.take(n)?;
                    self.push_str(b)?;
                }
                b'V' => {
                    let text = self.line()?;
                    if text.contains(&b'\\') {
                        return Err(format!(
                            "escaped protocol-0 UNICODE at byte {at} is not supported"
                        ));
                    }
                    self.push_str(text)?;
                }
                b')' => self.stack.push(PyValue::Tuple(Rc::new(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(PyValue::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(format!("stack underflow at byte {at}"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(PyValue::Tuple(Rc::new(items)));
                }
                b']' => self
                    .stack
                    .push(PyValue::List(Rc::new(RefCell::new(Vec::new())))),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(PyValue::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => self
                    .stack
                    .push(PyValue::Dict(Rc::new(RefCell::new(Vec::new())))),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack
                        .push(PyValue::Dict(Rc::new(RefCell::new(Vec::new()))));
                    self.set_items(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'c' => {
                    let module = self.text_line()?;
                    let name = self.text_line()?;
                    self.stack.push(PyValue::Global {
                        module: Rc::from(module.as_str()),
                        name: Rc::from(name.as_str()),
                    });
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (PyValue::Str(module), PyValue::Str(name)) => {
                            self.stack.push(PyValue::Global { module, name })
                        }
                        (m, n) => {
                            return Err(format!(
                                "STACK_GLOBAL on {} and {} at byte {at}",
                                m.kind(),
                                n.kind()
                            ))
                        }
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    match self.top_mut()? {
                        PyValue::Object(obj) => obj.borrow_mut().state = Some(state),
                        other => {
                            return Err(format!(
                                "BUILD on a {} at byte {at}, expected an object",
                                other.kind()
                            ))
                        }
                    }
                }
                b'p' => {
                    let text = self.text_line()?;
                    let key = text
                        .parse()
                        .map_err(|_| format!("bad PUT key {text:?} at byte {at}"))?;
                    self.memo_put(key)?;
                }
                b'q' => {
                    let key = self.u8()? as u32;
                    self.memo_put(key)?;
                }
                b'r' => {
                    let key = self.u32()?;
                    self.memo_put(key)?;
                }
                0x94 => {
                    let key = self.memo.len() as u32;
                    self.memo_put(key)?;
                }
                b'g' => {
                    let text = self.text_line()?;
                    let key = text
                        .parse()
                        .map_err(|_| format!("bad GET key {text:?} at byte {at}"))?;
                    let v = self.memo_get(key)?;
                    self.stack.push(v);
                }
                b'h' => {
                    let key = self.u8()? as u32;
                    let v = self.memo_get(key)?;
                    self.stack.push(v);
                }
                b'j' => {
                    let key = self.u32()?;
                    let v = self.memo_get(key)?;
                    self.stack.push(v);
                }
                0x97 | 0x98 => {
                    return Err(format!(
                    "out-of-band pickle buffers (opcode 0x{op:02x} at byte {at}) are not supported"
                ))
                }
                _ => return Err(format!("unsupported pickle opcode 0x{op:02x} at byte {at}")),
            }
        }
    }
}

/// Decodes a whole pickle stream into a symbolic value.
pub(crate) fn decode(data: &[u8]) -> PResult<PyValue> {
    Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

/// A 2-D `uint8` numpy array in row-major order.
#[derive(Debug)]
pub(crate) struct U8Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<u8>,
}

fn is_global(v: &PyValue, modules: &[&str], wanted: &str) -> bool {
    matches!(v, PyValue::Global { module, name } if modules.contains(&&**module) && &**name == wanted)
}

/// Checks that a pickled `numpy.dtype(...)` object is unsigned 8-bit.
fn check_u8_dtype(dtype: &PyValue) -> PResult<()> {
    let PyValue::Object(obj) = dtype else {
        return Err(format!(
            "array dtype is a {}, expected numpy.dtype",
            dtype.kind()
        ));
    };
    let obj = obj.borrow();
    if !is_global(&obj.callable, &["numpy"], "dtype") {
        return Err("array dtype is not a numpy.dtype".into());
    }
    let code = obj
        .args
        .items()
        .and_then(|a| a.first().and_then(PyValue::as_text))
        .ok_or("numpy.dtype without a type code")?;
    if code != "u1" && code != "|u1" && code != "uint8" {
        return Err(format!("array dtype is {code:?}, expected uint8 (\"u1\")"));
    }
    Ok(())
}

fn shape_of(v: &PyValue) -> PResult<Vec<usize>> {
    let items = v.items().ok_or("array shape is not a tuple")?;
    items
        .iter()
        .map(|d| match d {
            PyValue::Int(n) if *n >= 0 => Ok(*n as usize),
            other => Err(format!("array shape entry is a {}", other.kind())),
        })
        .collect()
}

fn raw_bytes(v: &PyValue) -> PResult<Rc<Vec<u8>>> {
    match v {
        PyValue::Bytes(b) => Ok(b.clone()),
        PyValue::Str(s) => {
            // python 2 pickles read with a latin1 convention
            let mut out = Vec::with_capacity(s.len());
            for ch in s.chars() {
                let code = ch as u32;
                if code > 255 {
                    return Err("array data string has non-latin1 characters".into());
                }
                out.push(code as u8);
            }
            Ok(Rc::new(out))
        }
        other => Err(format!("array data is a {}, expected bytes", other.kind())),
    }
}

fn make_matrix(shape: &[usize], raw: &[u8], fortran: bool) -> PResult<U8Matrix> {
    let (rows, cols) = match shape {
        [r, c] => (*r, *c),
        _ => return Err(format!("array has shape {shape:?}, expected 2 dimensions")),
    };
    if rows.checked_mul(cols) != Some(raw.len()) {
        return Err(format!(
            "array shape {rows}x{cols} does not match its {} data bytes",
            raw.len()
        ));
    }
    let data = if fortran {
        let mut out = vec![0u8; raw.len()];
        for c in 0..cols {
            for r in 0..rows {
                out[r * cols + c] = raw[c * rows + r];
            }
        }
        out
    } else {
        raw.to_vec()
    };
    Ok(U8Matrix { rows, cols, data })
}

/// Extracts a 2-D uint8 matrix from a pickled numpy array (both pickle forms numpy writes).
pub(crate) fn numpy_u8_matrix(v: &PyValue) -> PResult<U8Matrix> {
    let PyValue::Object(obj) = v else {
        return Err(format!("`data` is a {}, expected a numpy array", v.kind()));
    };
    let obj = obj.borrow();
    const MULTIARRAY: [&str; 2] = ["numpy.core.multiarray", "numpy._core.multiarray"];
    const NUMERIC: [&str; 2] = ["numpy.core.numeric", "numpy._core.numeric"];
    if is_global(&obj.callable, &MULTIARRAY, "_reconstruct") {
        let state = obj
            .state
            .as_ref()
            .ok_or("numpy array without state (missing BUILD)")?;
        let mut items = state.items().ok_or("numpy array state is not a tuple")?;
        // version 0 states have no leading version number
        if items.len() == 5 {
            items.remove(0);
        }
        if items.len() != 4 {
            return Err(format!(
                "numpy array state has {} entries, expected 4 or 5",
                items.len()
            ));
        }
        let shape = shape_of(&items[0])?;
        check_u8_dtype(&items[1])?;
        let fortran = match &items[2] {
            PyValue::Bool(b) => *b,
            PyValue::Int(i) => *i != 0,
            other => return Err(format!("numpy fortran flag is a {}", other.kind())),
        };
        let raw = raw_bytes(&items[3])?;
        make_matrix(&shape, &raw, fortran)
    } else if is_global(&obj.callable, &NUMERIC, "_frombuffer") {
        let args = obj
            .args
            .items()
            .ok_or("_frombuffer arguments are not a tuple")?;
        if args.len() != 4 {
            return Err(format!(
                "_frombuffer has {} arguments, expected 4",
                args.len()
            ));
        }
        let raw = raw_bytes(&args[0])?;
        check_u8_dtype(&args[1])?;
        let shape = shape_of(&args[2])?;
        let order = args[3].as_text().unwrap_or_else(|| "C".into());
        make_matrix(&shape, &raw, order == "F")
    } else {
        Err("`data` is an object that is not a numpy array".into())
    }
}

/// Looks up `key` in a pickled dict whose keys are `bytes` (python 2 files) or `str`.
pub(crate) fn dict_get(dict: &PyValue, key: &str) -> PResult<Option<PyValue>> {
    let PyValue::Dict(d) = dict else {
        return Err(format!(
            "top-level object is a {}, expected dict",
            dict.kind()
        ));
    };
    Ok(d.borrow()
        .iter()
        .find(|(k, _)| k.as_text().as_deref() == Some(key))
        .map(|(_, v)| v.clone()))
}

/// Reads a list or tuple of integers (CIFAR-10 stores its labels as a plain list).
pub(crate) fn int_list(v: &PyValue) -> PResult<Vec<i64>> {
    let items = v
        .items()
        .ok_or_else(|| format!("`labels` is a {}, expected a list", v.kind()))?;
    items
        .iter()
        .enumerate()
        .map(|(i, x)| match x {
            PyValue::Int(n) => Ok(*n),
            other => Err(format!("`labels`[{i}] is a {}, expected int", other.kind())),
        })
        .collect()
}
