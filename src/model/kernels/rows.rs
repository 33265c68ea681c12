//! Where the rows of a tensor lie, for kernels that read a view's rows in place (a slice of a
//! joint product's last dimension) instead of copying it contiguous first.

/// The distance in elements between consecutive rows of a tensor of `dims` (`(.., width)`)
/// laid out with `stride`, where every row is contiguous and the rows lie evenly apart (all
/// leading dimensions step as one): a contiguous tensor, or a slice of the last dimension of
/// one. `None` otherwise.
pub fn even_rows(dims: &[usize], stride: &[usize]) -> Option<usize> {
    let (&width, lead) = dims.split_last()?;
    if stride.len() != dims.len() || (width > 1 && stride.last() != Some(&1)) {
        return None;
    }
    let (mut row, mut next) = (None, None);
    for (&d, &s) in lead.iter().zip(stride).rev() {
        if d == 1 {
            continue;
        }
        match next {
            None => row = Some(s),
            Some(n) if n != s => return None,
            Some(_) => {}
        }
        next = Some(s * d);
    }
    let row = row.unwrap_or(width);
    (row >= width).then_some(row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn of(t: &Tensor) -> Option<usize> {
        even_rows(t.dims(), t.stride())
    }

    #[test]
    fn rows_of_contiguous_tensors_and_last_dimension_slices_lie_evenly() {
        let joint = Tensor::zeros((3, 1, 10), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(of(&joint), Some(10));
        assert_eq!(of(&joint.narrow(2, 4, 6).unwrap()), Some(10));
        let two = Tensor::zeros((2, 4, 10), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert_eq!(of(&two.narrow(2, 0, 3).unwrap()), Some(10));
        // Rows that are not contiguous, or that do not step evenly, are refused.
        assert_eq!(of(&two.transpose(1, 2).unwrap()), None);
        assert_eq!(of(&two.narrow(1, 0, 2).unwrap()), None);
        assert_eq!(even_rows(&[2, 3], &[1]), None);
        // One row: its width.
        assert_eq!(
            of(&joint.narrow(0, 1, 1).unwrap().narrow(2, 2, 3).unwrap()),
            Some(3)
        );
    }
}
