//! [`Batch`]: a packed batch of token sequences as the decoder takes it, built and checked on the host, moved to the
//! model's device whole except for what the host keeps reading (positions, and the ids an embedding table kept on the
//! host gathers from).

use qlora_runtime::ops::attention::SeqLens;
use qlora_runtime::{DType, Device, Tensor};

/// Token ids of a packed batch: sequences concatenated into one row, positions restarting at each sequence,
/// `cu_seqlens` marking the boundaries (attention never crosses them). `targets[i]` is the token position i
/// must predict, or −100.
///
/// Built on the host, where everything a step needs to know about it is read once (boundaries, trained tokens);
/// [`Batch::to_device`] moves ids, targets and the boundaries to the GPU while positions stay on the host, where the
/// rotary tables are built from them: a step never reads a batch back from the device.
#[derive(Clone, Debug)]
pub struct Batch {
    pub ids: Tensor,
    /// On the host, always.
    pub positions: Tensor,
    pub cu_seqlens: SeqLens,
    pub targets: Tensor,
    trained_tokens: usize,
    /// The ids as built, on the host (shared with `ids` until moved): what an embedding table kept on the host
    /// gathers from.
    host_ids: Tensor,
}

impl Batch {
    /// Builds a packed batch from whole sequences, each with next-token targets (the last token of each
    /// sequence predicts nothing). `labels[s][i]` = −100 masks position i as a target.
    pub fn pack(sequences: &[(Vec<i32>, Vec<i32>)]) -> qlora_runtime::Result<Self> {
        let (mut ids, mut pos, mut cu, mut targets) = (vec![], vec![], vec![0i32], vec![]);
        for (tokens, labels) in sequences {
            if tokens.len() != labels.len() {
                return Err(qlora_runtime::Error::invalid("batch", "tokens and labels differ in length"));
            }
            ids.extend(tokens);
            pos.extend(0..tokens.len() as i32);
            targets.extend(labels.iter().skip(1));
            if !tokens.is_empty() {
                targets.push(-100);
            }
            cu.push(ids.len() as i32);
        }
        let trained_tokens = targets.iter().filter(|&&t| t >= 0).count();
        let t = |v: Vec<i32>| {
            let n = v.len();
            Tensor::from_vec(v, &[n])
        };
        let cu_seqlens = SeqLens::new(&cu, Device::Cpu)?;
        let ids = t(ids)?;
        Ok(Batch { host_ids: ids.clone(), ids, positions: t(pos)?, cu_seqlens, targets: t(targets)?, trained_tokens })
    }

    /// A batch from its parts, all on the host (`targets` counted here, once).
    pub fn new(ids: Tensor, positions: Tensor, cu_seqlens: SeqLens, targets: Tensor) -> qlora_runtime::Result<Batch> {
        for (what, t) in [("ids", &ids), ("positions", &positions), ("targets", &targets)] {
            if t.device() != Device::Cpu || t.dtype() != DType::I32 {
                return Err(qlora_runtime::Error::invalid("batch", format!("{what} must be I32 on the host")));
            }
        }
        let trained_tokens = targets.values::<i32>().iter().filter(|&&t| t >= 0).count();
        Ok(Batch { host_ids: ids.clone(), ids, positions, cu_seqlens, targets, trained_tokens })
    }

    /// The batch on `device` (where the model runs): ids, targets and boundaries uploaded, positions kept on the host.
    pub fn to_device(&self, device: Device) -> qlora_runtime::Result<Batch> {
        Ok(Batch {
            ids: self.ids.to_device(device)?,
            positions: self.positions.clone(),
            cu_seqlens: self.cu_seqlens.to_device(device)?,
            targets: self.targets.to_device(device)?,
            trained_tokens: self.trained_tokens,
            host_ids: self.host_ids.clone(),
        })
    }

    /// The ids where an embedding table on `table` looks them up: the host copy for a table kept on the host (see
    /// [`CausalLm::batch_ids`](crate::transformer::CausalLm::batch_ids)).
    pub fn ids_on(&self, table: Device) -> &Tensor {
        if table == Device::Cpu {
            &self.host_ids
        } else {
            &self.ids
        }
    }

    /// Positions whose target is trained (not −100).
    pub fn trained_tokens(&self) -> usize {
        self.trained_tokens
    }
}
