//! Trainable parameters: values, gradients and AdamW moments, with the
//! Hugging Face names they are loaded from and saved under.

use std::ops::Range;

use crate::backend::train::{AdamW, Lora, ParamGrads, TrainBackend};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// Index of a parameter in its [`ParamStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamId(usize);

pub struct Param<B: TrainBackend> {
    /// Our name; equal to the Hugging Face name unless the tensor is fused.
    pub name: String,
    pub shape: Vec<usize>,
    /// Hugging Face tensors stacked along the first dimension to form this
    /// one (query, key and value form one QKV projection), with their rows.
    pub parts: Vec<(String, Range<usize>)>,
    /// Weight decay applies (not to biases or LayerNorm parameters).
    pub decay: bool,
    /// Frozen parameters get no gradient, no optimizer state, no update.
    pub trainable: bool,
    /// Multiplies the learning rate (discriminative learning rates).
    pub lr_scale: f32,
    pub value: B::Tensor,
    /// Allocated on first use, for trainable parameters only.
    pub grad: Option<B::Tensor>,
    m: Option<B::Tensor>,
    v: Option<B::Tensor>,
}

impl<B: TrainBackend> Param<B> {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `name` is a bias or LayerNorm parameter, which by standard
    /// practice (BERT, HF Trainer) get no weight decay.
    fn exempt_from_decay(name: &str) -> bool {
        name.ends_with(".bias") || name.contains("LayerNorm")
    }
}

pub struct ParamStore<B: TrainBackend> {
    params: Vec<Param<B>>,
}

impl<B: TrainBackend> Default for ParamStore<B> {
    fn default() -> Self {
        ParamStore { params: Vec::new() }
    }
}

impl<B: TrainBackend> std::ops::Index<ParamId> for ParamStore<B> {
    type Output = Param<B>;
    fn index(&self, id: ParamId) -> &Param<B> {
        &self.params[id.0]
    }
}

impl<B: TrainBackend> std::ops::IndexMut<ParamId> for ParamStore<B> {
    fn index_mut(&mut self, id: ParamId) -> &mut Param<B> {
        &mut self.params[id.0]
    }
}

impl<B: TrainBackend> ParamStore<B> {
    /// Adds a parameter with initial values `data`; `parts` lists the
    /// Hugging Face tensors it stacks (one part for an ordinary tensor).
    pub fn add(
        &mut self,
        backend: &B,
        name: &str,
        shape: &[usize],
        parts: Vec<(String, Range<usize>)>,
        data: &[f32],
    ) -> ParamId {
        let len = shape.iter().product::<usize>();
        assert_eq!(data.len(), len, "{name}: data length");
        self.params.push(Param {
            name: name.into(),
            shape: shape.to_vec(),
            decay: !Param::<B>::exempt_from_decay(name),
            trainable: true,
            lr_scale: 1.0,
            parts,
            value: backend.upload(data),
            grad: None,
            m: None,
            v: None,
        });
        ParamId(self.params.len() - 1)
    }

    /// Adds a Hugging Face tensor read from `ckpt`.
    pub fn load(
        &mut self,
        backend: &B,
        ckpt: &Checkpoint,
        name: &str,
        shape: &[usize],
    ) -> Result<ParamId> {
        let data = ckpt.tensor(name, shape)?;
        Ok(self.add(
            backend,
            name,
            shape,
            vec![(name.into(), 0..shape[0])],
            &data,
        ))
    }

    /// Adds tensors `names`, each of `shape`, stacked into one parameter.
    pub fn load_stacked(
        &mut self,
        backend: &B,
        ckpt: &Checkpoint,
        name: &str,
        names: &[String],
        shape: &[usize],
    ) -> Result<ParamId> {
        let mut data = Vec::new();
        let mut parts = Vec::new();
        for part in names {
            let rows = data.len() / shape[1..].iter().product::<usize>().max(1);
            data.extend_from_slice(&ckpt.tensor(part, shape)?);
            parts.push((part.clone(), rows..rows + shape[0]));
        }
        let mut stacked = shape.to_vec();
        stacked[0] *= names.len();
        Ok(self.add(backend, name, &stacked, parts, &data))
    }

    /// `weight`'s value with the gradients of `weight` and `bias` (None
    /// when frozen): what a linear or LayerNorm backward reads and writes.
    pub fn weight_and_grads(
        &mut self,
        weight: ParamId,
        bias: ParamId,
    ) -> (&B::Tensor, ParamGrads<'_, B::Tensor>) {
        assert!(weight.0 < bias.0, "bias follows its weight");
        let (head, tail) = self.params.split_at_mut(bias.0);
        let w = &mut head[weight.0];
        let grads = match (w.grad.as_mut(), tail[0].grad.as_mut()) {
            (Some(w_grad), Some(b_grad)) => Some((w_grad, b_grad)),
            _ => None,
        };
        (&w.value, grads)
    }

    /// A LoRA adapter's matrices `a` and `b` with `scale`, and their
    /// gradients (None when frozen): what a LoRA backward reads and writes.
    pub fn lora_and_grads(
        &mut self,
        a: ParamId,
        b: ParamId,
        scale: f32,
    ) -> (Lora<'_, B::Tensor>, ParamGrads<'_, B::Tensor>) {
        let [a, b] = self
            .params
            .get_disjoint_mut([a.0, b.0])
            .expect("distinct parameters");
        let grads = match (a.grad.as_mut(), b.grad.as_mut()) {
            (Some(a_grad), Some(b_grad)) => Some((a_grad, b_grad)),
            _ => None,
        };
        let lora = Lora {
            a: &a.value,
            b: &b.value,
            scale,
        };
        (lora, grads)
    }

    /// Gradients of distinct parameters, all writable at once; None if any
    /// of them is frozen.
    pub fn grads_mut<const N: usize>(&mut self, ids: [ParamId; N]) -> Option<[&mut B::Tensor; N]> {
        let params = self
            .params
            .get_disjoint_mut(ids.map(|id| id.0))
            .expect("distinct parameters");
        if params.iter().any(|p| p.grad.is_none()) {
            return None;
        }
        Some(params.map(|p| p.grad.as_mut().expect("checked above")))
    }

    pub fn is_trainable(&self, id: ParamId) -> bool {
        self.params[id.0].trainable
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param<B>> {
        self.params.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Param<B>> {
        self.params.iter_mut()
    }

    /// Zeroes the gradients of trainable parameters (allocating them on
    /// first use) and drops those of frozen ones.
    pub fn zero_grads(&mut self, backend: &B) {
        for p in &mut self.params {
            if !p.trainable {
                p.grad = None;
                continue;
            }
            match &mut p.grad {
                Some(grad) => backend.zero(grad),
                None => p.grad = Some(backend.upload(&vec![0.0; p.len()])),
            }
        }
    }

    fn trainable_grads(&self) -> impl Iterator<Item = &B::Tensor> {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .filter_map(|p| p.grad.as_ref())
    }

    /// Global L2 norm of all trainable gradients.
    pub fn grad_norm(&self, backend: &B) -> f64 {
        let grads: Vec<&B::Tensor> = self.trainable_grads().collect();
        backend.sum_squares_all(&grads).sqrt()
    }

    pub fn scale_grads(&mut self, backend: &B, factor: f32) {
        for grad in self
            .params
            .iter_mut()
            .filter(|p| p.trainable)
            .filter_map(|p| p.grad.as_mut())
        {
            backend.scale(grad, factor);
        }
    }

    /// One AdamW step on every trainable parameter, at its scaled learning
    /// rate; decay only where [`Param::decay`] says so. Moments are
    /// allocated on a parameter's first step.
    pub fn adamw_step(&mut self, backend: &B, update: AdamW) {
        for p in self.params.iter_mut().filter(|p| p.trainable) {
            let Some(grad) = &p.grad else {
                continue;
            };
            let update = AdamW {
                lr: update.lr * p.lr_scale,
                weight_decay: if p.decay { update.weight_decay } else { 0.0 },
                ..update
            };
            let len = p.len();
            let zeros = || backend.upload(&vec![0.0; len]);
            let m = p.m.get_or_insert_with(zeros);
            let v = p.v.get_or_insert_with(zeros);
            backend.adamw(&mut p.value, grad, m, v, update);
        }
    }

    /// Forgets every AdamW moment: the next step starts a fresh optimizer.
    pub fn reset_optimizer(&mut self) {
        for p in &mut self.params {
            p.m = None;
            p.v = None;
        }
    }

    /// A host copy of every parameter's values, for [`Self::restore`].
    pub fn snapshot(&self, backend: &B) -> Vec<Vec<f32>> {
        self.params
            .iter()
            .map(|p| backend.to_host(&p.value))
            .collect()
    }

    /// Puts back the values of a [`Self::snapshot`] of this store.
    pub fn restore(&mut self, backend: &B, snapshot: &[Vec<f32>]) {
        assert_eq!(
            snapshot.len(),
            self.params.len(),
            "a snapshot of this store"
        );
        for (p, values) in self.params.iter_mut().zip(snapshot) {
            p.value = backend.upload(values);
        }
    }

    /// SHA-256 of the values of `ids`, for logging which parameters moved.
    pub fn checksum(&self, backend: &B, ids: &[ParamId]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend(
                backend
                    .to_host(&self.params[id.0].value)
                    .iter()
                    .flat_map(|v| v.to_le_bytes()),
            );
        }
        crate::data::sha256_hex(&bytes)
    }

    /// Every Hugging Face tensor with its values, for saving.
    pub fn export(&self, backend: &B) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut out = Vec::new();
        for p in &self.params {
            let data = backend.to_host(&p.value);
            let row_len = p.shape[1..].iter().product::<usize>().max(1);
            for (name, rows) in &p.parts {
                let mut shape = p.shape.clone();
                shape[0] = rows.len();
                out.push((
                    name.clone(),
                    shape,
                    data[rows.start * row_len..rows.end * row_len].to_vec(),
                ));
            }
        }
        out
    }

    /// The gradient of Hugging Face tensor `name`, if held (tests compare
    /// against PyTorch's).
    pub fn grad_of(&self, backend: &B, name: &str) -> Option<Vec<f32>> {
        self.params.iter().find_map(|p| {
            let (_, rows) = p.parts.iter().find(|(n, _)| n == name)?;
            let row_len = p.shape[1..].iter().product::<usize>().max(1);
            Some(
                backend.to_host(p.grad.as_ref()?)[rows.start * row_len..rows.end * row_len]
                    .to_vec(),
            )
        })
    }

    /// Overwrites Hugging Face tensor `name` (a whole parameter or one part
    /// of a stacked one).
    pub fn set(&mut self, backend: &B, name: &str, data: &[f32]) -> Result<()> {
        let param = self
            .params
            .iter_mut()
            .find(|p| p.parts.iter().any(|(n, _)| n == name))
            .ok_or_else(|| Error::Invalid(format!("no parameter named {name}")))?;
        let rows = &param
            .parts
            .iter()
            .find(|(n, _)| n == name)
            .expect("found above")
            .1;
        let row_len = param.shape[1..].iter().product::<usize>().max(1);
        if data.len() != rows.len() * row_len {
            return Err(Error::Invalid(format!(
                "{name}: {} values given, {} expected",
                data.len(),
                rows.len() * row_len
            )));
        }
        let mut values = backend.to_host(&param.value);
        values[rows.start * row_len..rows.end * row_len].copy_from_slice(data);
        param.value = backend.upload(&values);
        Ok(())
    }

    pub fn parameter_count(&self) -> usize {
        self.params.iter().map(Param::len).sum()
    }
}
