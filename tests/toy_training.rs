//! The whole CPU stack trains: the toy decoder's loss falls far below chance, and training is
//! bit-reproducible from a seed.

use qlora_rt::kernels::Rng;
use qlora_rt::models::toy::{ToyConfig, ToyDecoder};
use qlora_rt::optim::{clip_grad_norm, AdamW, AdamWConfig};
use qlora_rt::Tape;

fn train(steps: usize, seed: u64) -> Vec<f64> {
    let model = ToyDecoder::new(ToyConfig::default(), seed);
    let params = model.params();
    let mut opt = AdamW::new(params.clone(), AdamWConfig { lr: 3e-3, ..Default::default() }).unwrap();
    let mut rng = Rng::new(seed);
    (0..steps)
        .map(|_| {
            let (ids, targets, pos, cu) = model.sample_batch(&mut rng);
            let tape = Tape::new();
            let loss = model.loss(&tape, &ids, &targets, &pos, &cu).unwrap();
            tape.backward(&loss).unwrap();
            clip_grad_norm(&params, 1.0).unwrap();
            opt.step().unwrap();
            loss.value().to_scalar::<f64>().unwrap()
        })
        .collect()
}

#[test]
fn toy_loss_falls_well_below_chance_and_is_reproducible() {
    let losses = train(120, 3);
    let chance = (ToyConfig::default().vocab as f64).ln();
    assert!((losses[0] - chance).abs() < 0.5, "initial loss {} should be near chance {chance}", losses[0]);
    let tail: f64 = losses[110..].iter().sum::<f64>() / 10.0;
    assert!(tail < 0.3 * chance, "loss should fall far below chance: {:?}", &losses[110..]);
    let again = train(20, 3);
    assert_eq!(
        losses[..20].iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        again.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
        "same seed, same losses, bit for bit"
    );
}
