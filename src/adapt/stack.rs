//! Two adapters at once: a collection's frozen domain adapter beneath a request's own. The
//! projection sees `W x + under(x) + over(x)`; only `over` is trained, so a request adapting
//! on top of the domain adapter never writes it.

use candle_core::{Result, Tensor};

use crate::model::{Adapter, Target};

pub struct Stack<'a> {
    pub under: &'a dyn Adapter,
    pub over: &'a dyn Adapter,
}

impl Adapter for Stack<'_> {
    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(
            match (
                self.under.delta(layer, target, x)?,
                self.over.delta(layer, target, x)?,
            ) {
                (Some(u), Some(o)) => Some((u + o)?),
                (u, o) => u.or(o),
            },
        )
    }

    fn begin_step(&self, step: Option<u64>) {
        self.under.begin_step(step);
        self.over.begin_step(step);
    }
}
