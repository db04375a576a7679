//! The linear schedule with warm-up, as transformers' `get_linear_schedule_with_warmup`.

/// Learning rate of optimizer step `t` (0-based) of `total`, with `warmup` warm-up steps.
pub fn linear_with_warmup(lr: f64, t: usize, total: usize, warmup: usize) -> f64 {
    if t < warmup {
        return lr * t as f64 / warmup.max(1) as f64;
    }
    let remaining = total.saturating_sub(t) as f64;
    let span = total.saturating_sub(warmup).max(1) as f64;
    lr * (remaining / span).max(0.0)
}

/// Warm-up steps for a ratio of the total: `ceil(ratio · total)`, as transformers.
pub fn warmup_steps(ratio: f64, total: usize) -> usize {
    (ratio * total as f64).ceil() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_recipe_warms_up_300_steps_then_decays_to_zero() {
        let (lr, total) = (2e-4, 10_000);
        let w = warmup_steps(0.03, total);
        assert_eq!(w, 300);
        assert_eq!(linear_with_warmup(lr, 0, total, w), 0.0);
        assert!((linear_with_warmup(lr, 150, total, w) - 1e-4).abs() < 1e-15);
        assert!((linear_with_warmup(lr, 300, total, w) - lr).abs() < 1e-15);
        let mid = linear_with_warmup(lr, 5150, total, w);
        assert!((mid - lr * 4850.0 / 9700.0).abs() < 1e-15);
        assert_eq!(linear_with_warmup(lr, total, total, w), 0.0);
    }
}
