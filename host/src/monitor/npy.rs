//! NumPy's `.npy` format (and `.npz`, a zip of `.npy` files stored without compression, as
//! `numpy.savez` writes them): how a model's reference sample travels. Only what a reference
//! needs is read: little-endian (or single-byte) numbers in C order, as `f64`.

use std::collections::BTreeMap;

/// An array read from a `.npy` file: its shape and its values in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl Array {
    /// Rows (the leading axis; 1 for a scalar) and values per row.
    pub fn rows(&self) -> (usize, usize) {
        match self.shape.split_first() {
            Some((&rows, rest)) => (rows, rest.iter().product()),
            None => (1, 1),
        }
    }
}

/// Reads a reference file: one unnamed array (`.npy`) or arrays by name (`.npz`), of at
/// most `max_values` values in all (checked before any is decoded).
pub fn read_reference(bytes: &[u8], max_values: usize) -> Result<BTreeMap<String, Array>, String> {
    let mut budget = max_values;
    if bytes.starts_with(b"\x93NUMPY") {
        return Ok(BTreeMap::from([(
            String::new(),
            parse(bytes, &mut budget)?,
        )]));
    }
    if bytes.starts_with(b"PK\x03\x04") {
        return read_npz(bytes, &mut budget);
    }
    Err("not a .npy or .npz file (no NumPy or zip magic at its start)".into())
}

/// Parses one `.npy` file of at most `budget` values (what it holds is taken from it).
pub fn parse(bytes: &[u8], budget: &mut usize) -> Result<Array, String> {
    let rest = bytes
        .strip_prefix(b"\x93NUMPY")
        .ok_or("not a .npy file (no \\x93NUMPY magic)")?;
    let (&major, rest) = rest.split_first().ok_or("truncated .npy header")?;
    let rest = rest.get(1..).ok_or("truncated .npy header")?;
    let (len, rest) = match major {
        1 => {
            let b = rest.get(..2).ok_or("truncated .npy header")?;
            (u16::from_le_bytes([b[0], b[1]]) as usize, &rest[2..])
        }
        2 | 3 => {
            let b = rest.get(..4).ok_or("truncated .npy header")?;
            (
                u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize,
                &rest[4..],
            )
        }
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    let header = rest.get(..len).ok_or("truncated .npy header")?;
    let header = std::str::from_utf8(header).map_err(|_| ".npy header is not text")?;
    let data = &rest[len..];
    let descr = field(header, "descr").ok_or(".npy header has no 'descr'")?;
    let descr = descr
        .strip_prefix(['\'', '"'])
        .and_then(|d| d.split(['\'', '"']).next())
        .ok_or(".npy 'descr' is not a string")?;
    if field(header, "fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err("Fortran-ordered arrays are not supported; save the array in C order".into());
    }
    let shape_text = field(header, "shape").ok_or(".npy header has no 'shape'")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or(".npy shape is not a tuple")?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad .npy shape {s:?}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or(".npy shape overflows")?;
    let (size, decode): (usize, fn(&[u8]) -> f64) = match descr {
        "<f8" => (8, |b| f64::from_le_bytes(b.try_into().unwrap_or_default())),
        "<f4" => (4, |b| {
            f32::from_le_bytes(b.try_into().unwrap_or_default()) as f64
        }),
        "<i8" => (8, |b| {
            i64::from_le_bytes(b.try_into().unwrap_or_default()) as f64
        }),
        "<i4" => (4, |b| {
            i32::from_le_bytes(b.try_into().unwrap_or_default()) as f64
        }),
        "<i2" => (2, |b| {
            i16::from_le_bytes(b.try_into().unwrap_or_default()) as f64
        }),
        "<u2" => (2, |b| {
            u16::from_le_bytes(b.try_into().unwrap_or_default()) as f64
        }),
        "<u4" => (4, |b| {
            u32::from_le_bytes(b.try_into().unwrap_or_default()) as f64
        }),
        "|u1" | "<u1" => (1, |b| b[0] as f64),
        "|i1" | "<i1" => (1, |b| b[0] as i8 as f64),
        "|b1" => (1, |b| (b[0] != 0) as u8 as f64),
        other => {
            return Err(format!(
                ".npy element type {other:?} is not supported (use little-endian float, int or uint)"
            ));
        }
    };
    if count > *budget {
        return Err(format!(
            "the reference holds too many values (an array of {count} with room for {budget} more); sample it down"
        ));
    }
    *budget -= count;
    let need = count.checked_mul(size).ok_or(".npy shape overflows")?;
    if data.len() != need {
        return Err(format!(
            ".npy data is {} bytes; shape {shape:?} of {descr} needs {need}",
            data.len()
        ));
    }
    Ok(Array {
        shape,
        values: data.chunks_exact(size).map(decode).collect(),
    })
}

/// The text after `'key':` in a `.npy` header dict, up to the end of the header.
fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[at + key.len() + 2..];
    Some(rest.trim_start().strip_prefix(':')?.trim_start())
}

/// Reads the `.npy` members of a zip written without compression (`numpy.savez`).
fn read_npz(bytes: &[u8], budget: &mut usize) -> Result<BTreeMap<String, Array>, String> {
    let mut out = BTreeMap::new();
    let mut at = 0usize;
    let u16_at = |i: usize| -> Result<usize, String> {
        bytes
            .get(i..i + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
            .ok_or_else(|| "truncated .npz".to_string())
    };
    let u32_at = |i: usize| -> Result<usize, String> {
        bytes
            .get(i..i + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| "truncated .npz".to_string())
    };
    while bytes.get(at..at + 4) == Some(b"PK\x03\x04") {
        let flags = u16_at(at + 6)?;
        let method = u16_at(at + 8)?;
        let mut size = u32_at(at + 18)?;
        let name_len = u16_at(at + 26)?;
        let extra_len = u16_at(at + 28)?;
        let name = bytes
            .get(at + 30..at + 30 + name_len)
            .ok_or("truncated .npz")?;
        let name = String::from_utf8_lossy(name).into_owned();
        let extra = bytes
            .get(at + 30 + name_len..at + 30 + name_len + extra_len)
            .ok_or("truncated .npz")?;
        if size == 0xFFFF_FFFF {
            // Zip64 (numpy writes it for large members): the sizes are in the extra field.
            size = zip64_size(extra).ok_or("truncated zip64 member in .npz")?;
        }
        if method != 0 {
            return Err(format!(
                ".npz member {name:?} is compressed; write the reference with numpy.savez, not savez_compressed"
            ));
        }
        if flags & 0x08 != 0 && size == 0 {
            return Err(format!(
                ".npz member {name:?} has no size in its header (streamed zip); write it with numpy.savez"
            ));
        }
        let start = at + 30 + name_len + extra_len;
        let data = bytes.get(start..start + size).ok_or("truncated .npz")?;
        let key = name.strip_suffix(".npy").unwrap_or(&name).to_string();
        let array = parse(data, budget).map_err(|e| format!("{name}: {e}"))?;
        out.insert(key, array);
        at = start + size;
        if flags & 0x08 != 0 {
            // A data descriptor follows (optionally signed): skip it.
            at += if bytes.get(at..at + 4) == Some(b"PK\x07\x08") {
                16
            } else {
                12
            };
        }
    }
    if out.is_empty() {
        return Err(".npz holds no arrays".into());
    }
    Ok(out)
}

/// The uncompressed size from a zip64 extra field.
fn zip64_size(extra: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 4 <= extra.len() {
        let id = u16::from_le_bytes([extra[i], extra[i + 1]]);
        let len = u16::from_le_bytes([extra[i + 2], extra[i + 3]]) as usize;
        if id == 1 {
            let b = extra.get(i + 4..i + 12)?;
            return usize::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok();
        }
        i += 4 + len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8]) -> Result<Array, String> {
        parse(bytes, &mut usize::MAX.clone())
    }

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut header =
            format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((header.len() as u16).to_le_bytes());
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    #[test]
    fn npy_reads_floats_ints_and_bytes() {
        let data: Vec<u8> = [1.5f32, -2.0, 3.0, 4.25]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let a = parse_all(&npy("<f4", "(2, 2)", &data)).expect("f4");
        assert_eq!(a.shape, [2, 2]);
        assert_eq!(a.values, [1.5, -2.0, 3.0, 4.25]);
        assert_eq!(a.rows(), (2, 2));
        let data: Vec<u8> = [7i64, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            parse_all(&npy("<i8", "(2,)", &data)).expect("i8").values,
            [7.0, -1.0]
        );
        assert_eq!(
            parse_all(&npy("|u1", "(3,)", &[0, 9, 255]))
                .expect("u1")
                .values,
            [0.0, 9.0, 255.0]
        );
    }

    #[test]
    fn npy_refuses_what_it_cannot_read_with_the_reason() {
        let wrong = parse_all(&npy("<f4", "(2, 2)", &[0; 12])).expect_err("short data");
        assert!(wrong.contains("needs 16"), "{wrong}");
        let big = parse_all(&npy(">f4", "(1,)", &[0; 4])).expect_err("big-endian");
        assert!(big.contains(">f4"), "{big}");
        assert!(read_reference(b"hello", 10).is_err());
        let fortran = npy("<f4", "(1,)", &[0; 4]);
        let fortran = String::from_utf8_lossy(&fortran).replace("False", "True ");
        assert!(parse_all(fortran.as_bytes()).is_err());
    }

    #[test]
    fn npz_of_stored_members_reads_each_array_by_name() {
        let member = |name: &str, body: &[u8]| {
            let mut m = b"PK\x03\x04".to_vec();
            m.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            m.extend((body.len() as u32).to_le_bytes());
            m.extend((body.len() as u32).to_le_bytes());
            m.extend((name.len() as u16).to_le_bytes());
            m.extend(0u16.to_le_bytes());
            m.extend(name.as_bytes());
            m.extend(body);
            m
        };
        let mut zip = member("a.npy", &npy("|u1", "(2,)", &[1, 2]));
        zip.extend(member("b.npy", &npy("|u1", "(1,)", &[3])));
        zip.extend(b"PK\x01\x02 central directory follows");
        let arrays = read_reference(&zip, 10).expect("npz");
        assert!(
            read_reference(&zip, 2).is_err(),
            "three values over a budget of two"
        );
        assert_eq!(arrays["a"].values, [1.0, 2.0]);
        assert_eq!(arrays["b"].values, [3.0]);
    }
}
