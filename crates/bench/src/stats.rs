//! Summary statistics as `vllm bench serve` computes them (NumPy's default percentile:
//! linear interpolation between closest ranks).

#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
    pub std: f64,
    pub p90: f64,
    pub p99: f64,
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = p / 100.0 * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

pub fn summarize(values: &[f64]) -> Summary {
    if values.is_empty() {
        return Summary::default();
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    Summary {
        mean,
        median: percentile(&v, 50.0),
        std: var.sqrt(),
        p90: percentile(&v, 90.0),
        p99: percentile(&v, 99.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_numpy_linear_percentiles() {
        // numpy.percentile([1, 2, 3, 4, 10], [50, 90, 99]) = 3, 7.6, 9.76
        let s = summarize(&[10.0, 2.0, 4.0, 1.0, 3.0]);
        assert_eq!(s.median, 3.0);
        assert!((s.p90 - 7.6).abs() < 1e-12);
        assert!((s.p99 - 9.76).abs() < 1e-12);
        assert!((s.mean - 4.0).abs() < 1e-12);
        // numpy.std (population): sqrt(((3^2)+(2^2)+0+(1^2)+(6^2))/5) = sqrt(10)
        assert!((s.std - 10f64.sqrt()).abs() < 1e-12);
        assert_eq!(summarize(&[]), Summary::default());
        assert_eq!(percentile(&[5.0], 99.0), 5.0);
    }
}
