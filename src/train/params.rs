//! Trainable parameters: values, gradients and AdamW moments, with the
//! Hugging Face names they are loaded from and saved under.

use std::ops::Range;

use crate::backend::train::{AdamW, TrainBackend};
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
    pub trainable: bool,
    pub value: B::Tensor,
    pub grad: B::Tensor,
    m: B::Tensor,
    v: B::Tensor,
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
        let zeros = vec![0.0; len];
        self.params.push(Param {
            name: name.into(),
            shape: shape.to_vec(),
            decay: !Param::<B>::exempt_from_decay(name),
            trainable: true,
            parts,
            value: backend.upload(data),
            grad: backend.upload(&zeros),
            m: backend.upload(&zeros),
            v: backend.upload(&zeros),
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

    /// `weight`'s value with the gradients of `weight` and `bias`: what a
    /// linear or LayerNorm backward reads and writes.
    pub fn weight_and_grads(
        &mut self,
        weight: ParamId,
        bias: ParamId,
    ) -> (&B::Tensor, (&mut B::Tensor, &mut B::Tensor)) {
        assert!(weight.0 < bias.0, "bias follows its weight");
        let (head, tail) = self.params.split_at_mut(bias.0);
        let w = &mut head[weight.0];
        (&w.value, (&mut w.grad, &mut tail[0].grad))
    }

    /// Gradients of distinct parameters, all writable at once.
    pub fn grads_mut<const N: usize>(&mut self, ids: [ParamId; N]) -> [&mut B::Tensor; N] {
        self.params
            .get_disjoint_mut(ids.map(|id| id.0))
            .expect("distinct parameters")
            .map(|p| &mut p.grad)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Param<B>> {
        self.params.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Param<B>> {
        self.params.iter_mut()
    }

    pub fn zero_grads(&mut self, backend: &B) {
        for p in &mut self.params {
            backend.zero(&mut p.grad);
        }
    }

    /// Global L2 norm of all trainable gradients.
    pub fn grad_norm(&self, backend: &B) -> f64 {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(|p| backend.sum_squares(&p.grad))
            .sum::<f64>()
            .sqrt()
    }

    pub fn grads_finite(&self, backend: &B) -> bool {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .all(|p| backend.all_finite(&p.grad))
    }

    pub fn scale_grads(&mut self, backend: &B, factor: f32) {
        for p in self.params.iter_mut().filter(|p| p.trainable) {
            backend.scale(&mut p.grad, factor);
        }
    }

    /// One AdamW step on every trainable parameter; decay only where
    /// [`Param::decay`] says so.
    pub fn adamw_step(&mut self, backend: &B, update: AdamW) {
        for p in self.params.iter_mut().filter(|p| p.trainable) {
            let update = AdamW {
                weight_decay: if p.decay { update.weight_decay } else { 0.0 },
                ..update
            };
            backend.adamw(&mut p.value, &p.grad, &mut p.m, &mut p.v, update);
        }
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
            Some(backend.to_host(&p.grad)[rows.start * row_len..rows.end * row_len].to_vec())
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
