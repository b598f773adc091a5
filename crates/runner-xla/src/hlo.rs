//! A small builder that prints StableHLO (MLIR generic op syntax) for the programs this runner
//! compiles. Every op is written in the generic form `"stablehlo.op"(operands) {attrs} : type`,
//! which every StableHLO parser accepts whatever its pretty-printer conventions.

use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Elem {
    F32,
    F16,
    BF16,
    F8E4M3FN,
    F8E5M2,
    I8,
    I32,
    U32,
    I1,
}

impl Elem {
    pub fn mlir(self) -> &'static str {
        match self {
            Elem::F32 => "f32",
            Elem::F16 => "f16",
            Elem::BF16 => "bf16",
            Elem::F8E4M3FN => "f8E4M3FN",
            Elem::F8E5M2 => "f8E5M2",
            Elem::I8 => "i8",
            Elem::I32 => "i32",
            Elem::U32 => "ui32",
            Elem::I1 => "i1",
        }
    }

    /// Bytes per element (a predicate takes one).
    pub fn bytes(self) -> usize {
        match self {
            Elem::F32 | Elem::I32 | Elem::U32 => 4,
            Elem::F16 | Elem::BF16 => 2,
            Elem::F8E4M3FN | Elem::F8E5M2 | Elem::I8 | Elem::I1 => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ty {
    pub dims: Vec<i64>,
    pub elem: Elem,
}

impl Ty {
    pub fn new(dims: &[i64], elem: Elem) -> Ty {
        Ty {
            dims: dims.to_vec(),
            elem,
        }
    }

    pub fn mlir(&self) -> String {
        let mut s = String::from("tensor<");
        for d in &self.dims {
            write!(s, "{d}x").expect("write to String");
        }
        s.push_str(self.elem.mlir());
        s.push('>');
        s
    }

    pub fn with_elem(&self, elem: Elem) -> Ty {
        Ty {
            dims: self.dims.clone(),
            elem,
        }
    }
}

/// An SSA value and its type.
#[derive(Debug, Clone)]
pub struct V {
    pub name: String,
    pub ty: Ty,
}

impl V {
    pub fn dims(&self) -> &[i64] {
        &self.ty.dims
    }
}

fn join(v: &[i64]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn i64_array(v: &[i64]) -> String {
    let items: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    if items.is_empty() {
        "array<i64>".into()
    } else {
        format!("array<i64: {}>", items.join(", "))
    }
}

fn list(v: &[i64]) -> String {
    let items: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", items.join(", "))
}

/// Emits the body of one region (function or loop body).
pub struct Block {
    lines: Vec<String>,
    counter: usize,
    prefix: String,
}

#[derive(Clone, Copy, Debug)]
pub enum Cmp {
    Eq,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Block {
    pub fn new(prefix: &str) -> Block {
        Block {
            lines: Vec::new(),
            counter: 0,
            prefix: prefix.to_string(),
        }
    }

    pub fn into_lines(self) -> Vec<String> {
        self.lines
    }

    fn fresh(&mut self) -> String {
        self.counter += 1;
        format!("%{}{}", self.prefix, self.counter)
    }

    fn op(&mut self, text: String, ty: Ty) -> V {
        let name = self.fresh();
        self.lines.push(format!("{name} = {text}"));
        V { name, ty }
    }

    fn types(vals: &[&V]) -> String {
        vals.iter()
            .map(|v| v.ty.mlir())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn names(vals: &[&V]) -> String {
        vals.iter()
            .map(|v| v.name.clone())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `"stablehlo.<op>"(operands) {attrs} : (types) -> result`
    pub fn generic(&mut self, op: &str, operands: &[&V], attrs: &str, result: Ty) -> V {
        self.named(&format!("stablehlo.{op}"), operands, attrs, result)
    }

    /// `"stablehlo.custom_call"(operands) {call_target_name = target, attrs} : … -> result`
    pub fn custom_call(&mut self, target: &str, operands: &[&V], attrs: &str, result: Ty) -> V {
        let attrs = format!("call_target_name = \"{target}\", {attrs}");
        self.named("stablehlo.custom_call", operands, &attrs, result)
    }

    /// `"func.call"(operands) {callee = @callee, attrs} : … -> result`; `attrs` starts with
    /// a comma when given.
    pub fn call(&mut self, callee: &str, operands: &[&V], attrs: &str, result: Ty) -> V {
        self.named(
            "func.call",
            operands,
            &format!("callee = @{callee}{attrs}"),
            result,
        )
    }

    /// `"<name>"(operands) {attrs} : (types) -> result`, in MLIR's generic form.
    fn named(&mut self, name: &str, operands: &[&V], attrs: &str, result: Ty) -> V {
        let attrs = if attrs.is_empty() {
            String::new()
        } else {
            format!(" {{{attrs}}}")
        };
        let text = format!(
            "\"{name}\"({}){attrs} : ({}) -> {}",
            Self::names(operands),
            Self::types(operands),
            result.mlir()
        );
        self.op(text, result)
    }

    pub fn push_raw(&mut self, line: String) {
        self.lines.push(line);
    }

    pub fn constant_f32(&mut self, value: f32, dims: &[i64]) -> V {
        let ty = Ty::new(dims, Elem::F32);
        // Bit-exact hex form (also the only spelling MLIR has for infinities).
        let lit = format!("0x{:08X}", value.to_bits());
        let text = format!(
            "\"stablehlo.constant\"() {{value = dense<{lit}> : {}}} : () -> {}",
            ty.mlir(),
            ty.mlir()
        );
        self.op(text, ty)
    }

    /// A 1-D integer constant of `values`.
    pub fn constant_ints(&mut self, values: &[i64], elem: Elem) -> V {
        let ty = Ty::new(&[values.len() as i64], elem);
        let items: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        let text = format!(
            "\"stablehlo.constant\"() {{value = dense<[{}]> : {}}} : () -> {}",
            items.join(", "),
            ty.mlir(),
            ty.mlir()
        );
        self.op(text, ty)
    }

    pub fn constant_int(&mut self, value: i64, dims: &[i64], elem: Elem) -> V {
        let ty = Ty::new(dims, elem);
        let text = format!(
            "\"stablehlo.constant\"() {{value = dense<{value}> : {}}} : () -> {}",
            ty.mlir(),
            ty.mlir()
        );
        self.op(text, ty)
    }

    pub fn binary(&mut self, op: &str, a: &V, b: &V) -> V {
        assert_eq!(a.ty, b.ty, "{op}: operand types differ");
        let ty = a.ty.clone();
        self.generic(op, &[a, b], "", ty)
    }

    pub fn add(&mut self, a: &V, b: &V) -> V {
        self.binary("add", a, b)
    }
    pub fn sub(&mut self, a: &V, b: &V) -> V {
        self.binary("subtract", a, b)
    }
    pub fn mul(&mut self, a: &V, b: &V) -> V {
        self.binary("multiply", a, b)
    }
    pub fn div(&mut self, a: &V, b: &V) -> V {
        self.binary("divide", a, b)
    }
    pub fn max(&mut self, a: &V, b: &V) -> V {
        self.binary("maximum", a, b)
    }
    pub fn xor(&mut self, a: &V, b: &V) -> V {
        self.binary("xor", a, b)
    }
    pub fn shr(&mut self, a: &V, b: &V) -> V {
        self.binary("shift_right_logical", a, b)
    }
    pub fn shr_arith(&mut self, a: &V, b: &V) -> V {
        self.binary("shift_right_arithmetic", a, b)
    }
    pub fn and(&mut self, a: &V, b: &V) -> V {
        self.binary("and", a, b)
    }

    /// Reinterprets the bits of `a` as another element type of the same width.
    pub fn bitcast(&mut self, a: &V, elem: Elem) -> V {
        let ty = a.ty.with_elem(elem);
        self.generic("bitcast_convert", &[a], "", ty)
    }

    pub fn unary(&mut self, op: &str, a: &V) -> V {
        let ty = a.ty.clone();
        self.generic(op, &[a], "", ty)
    }

    pub fn convert(&mut self, a: &V, elem: Elem) -> V {
        if a.ty.elem == elem {
            return a.clone();
        }
        let ty = a.ty.with_elem(elem);
        self.generic("convert", &[a], "", ty)
    }

    pub fn reshape(&mut self, a: &V, dims: &[i64]) -> V {
        assert_eq!(
            a.dims().iter().product::<i64>(),
            dims.iter().product::<i64>(),
            "reshape {:?} -> {dims:?}",
            a.dims()
        );
        let ty = Ty::new(dims, a.ty.elem);
        self.generic("reshape", &[a], "", ty)
    }

    pub fn broadcast(&mut self, a: &V, dims: &[i64], mapping: &[i64]) -> V {
        let ty = Ty::new(dims, a.ty.elem);
        let attrs = format!("broadcast_dimensions = {}", i64_array(mapping));
        self.generic("broadcast_in_dim", &[a], &attrs, ty)
    }

    pub fn transpose(&mut self, a: &V, perm: &[i64]) -> V {
        let dims: Vec<i64> = perm.iter().map(|&p| a.dims()[p as usize]).collect();
        let ty = Ty::new(&dims, a.ty.elem);
        let attrs = format!("permutation = {}", i64_array(perm));
        self.generic("transpose", &[a], &attrs, ty)
    }

    pub fn iota(&mut self, dims: &[i64], dim: i64, elem: Elem) -> V {
        let ty = Ty::new(dims, elem);
        let text = format!(
            "\"stablehlo.iota\"() {{iota_dimension = {dim} : i64}} : () -> {}",
            ty.mlir()
        );
        self.op(text, ty)
    }

    pub fn compare(&mut self, cmp: Cmp, a: &V, b: &V) -> V {
        let dir = match cmp {
            Cmp::Eq => "EQ",
            Cmp::Lt => "LT",
            Cmp::Le => "LE",
            Cmp::Gt => "GT",
            Cmp::Ge => "GE",
        };
        let ty = a.ty.with_elem(Elem::I1);
        let attrs = format!("comparison_direction = #stablehlo<comparison_direction {dir}>");
        self.generic("compare", &[a, b], &attrs, ty)
    }

    pub fn select(&mut self, pred: &V, on_true: &V, on_false: &V) -> V {
        let ty = on_true.ty.clone();
        self.generic("select", &[pred, on_true, on_false], "", ty)
    }

    pub fn slice(&mut self, a: &V, start: &[i64], limit: &[i64]) -> V {
        let dims: Vec<i64> = start.iter().zip(limit).map(|(s, l)| l - s).collect();
        let strides = vec![1i64; start.len()];
        let attrs = format!(
            "start_indices = {}, limit_indices = {}, strides = {}",
            i64_array(start),
            i64_array(limit),
            i64_array(&strides)
        );
        let ty = Ty::new(&dims, a.ty.elem);
        self.generic("slice", &[a], &attrs, ty)
    }

    pub fn concat(&mut self, parts: &[&V], dim: i64) -> V {
        let mut dims = parts[0].dims().to_vec();
        dims[dim as usize] = parts.iter().map(|p| p.dims()[dim as usize]).sum();
        let ty = Ty::new(&dims, parts[0].ty.elem);
        let attrs = format!("dimension = {dim} : i64");
        self.generic("concatenate", parts, &attrs, ty)
    }

    /// `dynamic_slice(a, idx...)` with scalar i32 start indices.
    pub fn dynamic_slice(&mut self, a: &V, starts: &[&V], sizes: &[i64]) -> V {
        let mut ops = vec![a];
        ops.extend_from_slice(starts);
        let ty = Ty::new(sizes, a.ty.elem);
        let attrs = format!("slice_sizes = {}", i64_array(sizes));
        self.generic("dynamic_slice", &ops, &attrs, ty)
    }

    /// Writes `update` into `a` at scalar i32 start indices.
    pub fn dynamic_update_slice(&mut self, a: &V, update: &V, starts: &[&V]) -> V {
        let mut ops = vec![a, update];
        ops.extend_from_slice(starts);
        let ty = a.ty.clone();
        self.generic("dynamic_update_slice", &ops, "", ty)
    }

    /// General dot with explicit batch and contracting dimensions; the result element type
    /// may be wider than the operands' (bf16 × bf16 → f32 accumulates in f32).
    pub fn dot_general(
        &mut self,
        a: &V,
        b: &V,
        batch: (&[i64], &[i64]),
        contract: (&[i64], &[i64]),
        result_elem: Elem,
    ) -> V {
        let mut dims: Vec<i64> = batch.0.iter().map(|&d| a.dims()[d as usize]).collect();
        for (i, &d) in a.dims().iter().enumerate() {
            let i = i as i64;
            if !batch.0.contains(&i) && !contract.0.contains(&i) {
                dims.push(d);
            }
        }
        for (i, &d) in b.dims().iter().enumerate() {
            let i = i as i64;
            if !batch.1.contains(&i) && !contract.1.contains(&i) {
                dims.push(d);
            }
        }
        let attrs = format!(
            "dot_dimension_numbers = #stablehlo.dot<lhs_batching_dimensions = {}, rhs_batching_dimensions = {}, lhs_contracting_dimensions = {}, rhs_contracting_dimensions = {}>",
            list(batch.0),
            list(batch.1),
            list(contract.0),
            list(contract.1)
        );
        // f32 operands ask for full f32 products: XLA's DEFAULT lets GPUs use TF32 and TPUs
        // a single bf16 pass, which would break `--dtype float32` accuracy.
        let attrs = if a.ty.elem == Elem::F32 && b.ty.elem == Elem::F32 {
            format!(
                "{attrs}, precision_config = [#stablehlo<precision HIGHEST>, #stablehlo<precision HIGHEST>]"
            )
        } else {
            attrs
        };
        self.generic("dot_general", &[a, b], &attrs, Ty::new(&dims, result_elem))
    }

    /// Reduces `a` over `dims` with a binary op (`add`, `maximum`, `minimum`).
    pub fn reduce(&mut self, a: &V, init: &V, dims: &[i64], op: &str) -> V {
        let out: Vec<i64> = a
            .dims()
            .iter()
            .enumerate()
            .filter(|(i, _)| !dims.contains(&(*i as i64)))
            .map(|(_, &d)| d)
            .collect();
        let ty = Ty::new(&out, a.ty.elem);
        let s = Ty::new(&[], a.ty.elem).mlir();
        let name = self.fresh();
        let (x, y, r) = (format!("{name}a"), format!("{name}b"), format!("{name}r"));
        self.lines.push(format!(
            "{name} = \"stablehlo.reduce\"({}, {}) ({{\n  ^bb0({x}: {s}, {y}: {s}):\n    {r} = \"stablehlo.{op}\"({x}, {y}) : ({s}, {s}) -> {s}\n    \"stablehlo.return\"({r}) : ({s}) -> ()\n  }}) {{dimensions = {}}} : ({}, {}) -> {}",
            a.name,
            init.name,
            i64_array(dims),
            a.ty.mlir(),
            init.ty.mlir(),
            ty.mlir()
        ));
        V { name, ty }
    }

    /// Rows of `table [N, W...]` picked by `idx` (any shape, i32) → `idx.shape + [W...]`.
    /// Only the leading axis is indexed: the row's other axes are whole slices, so a table
    /// sharded on one of them stays sharded without any collective (GSPMD passes the axis
    /// through).
    pub fn take_rows(&mut self, table: &V, idx: &V) -> V {
        let row: Vec<i64> = table.dims()[1..].to_vec();
        let n_idx = idx.dims().iter().product::<i64>();
        let flat = self.reshape(idx, &[n_idx, 1]);
        let offset_dims: Vec<i64> = (1..=row.len() as i64).collect();
        let mut slice = vec![1];
        slice.extend(&row);
        let attrs = format!(
            "dimension_numbers = #stablehlo.gather<offset_dims = [{}], collapsed_slice_dims = [0], start_index_map = [0], index_vector_dim = 1>, slice_sizes = {}, indices_are_sorted = false",
            join(&offset_dims),
            i64_array(&slice)
        );
        let mut gathered = vec![n_idx];
        gathered.extend(&row);
        let g = self.generic(
            "gather",
            &[table, &flat],
            &attrs,
            Ty::new(&gathered, table.ty.elem),
        );
        let mut dims = idx.dims().to_vec();
        dims.extend(&row);
        self.reshape(&g, &dims)
    }

    /// Pages of a paged cache `[N, H, P, D]` for `idx [A, B]` (i32 row numbers) →
    /// `[A, H, B, P, D]`: each head's page is its own `[P, D]` tile of the cache, and `H` is
    /// a batching axis of the gather (as in [`Block::scatter_rows`]), so the result comes out
    /// in the order the attention dots want (batch axes `A, H` first) as the gather's natural
    /// order: batch dimensions, then the window. (With `H` in the window the natural order is
    /// `[A, B, H, P, D]`, and with more than one KV head per chip the TPU compiler copied
    /// every gathered page once more into the dots' order.) A cache sharded on `H` stays
    /// sharded: the indices are sharded with it.
    pub fn gather_pages(&mut self, table: &V, idx: &V) -> V {
        let t = table.dims();
        let (a, bb) = (idx.dims()[0], idx.dims()[1]);
        let idx3 = self.broadcast(idx, &[a, t[1], bb], &[0, 2]);
        let attrs = format!(
            "dimension_numbers = #stablehlo.gather<offset_dims = [3, 4], collapsed_slice_dims = [0], operand_batching_dims = [1], start_indices_batching_dims = [1], start_index_map = [0], index_vector_dim = 3>, slice_sizes = {}, indices_are_sorted = false",
            i64_array(&[1, 1, t[2], t[3]])
        );
        self.generic(
            "gather",
            &[table, &idx3],
            &attrs,
            Ty::new(&[a, t[1], bb, t[2], t[3]], table.ty.elem),
        )
    }

    /// Writes whole pages: `updates [A, H, P, D]` replace rows `idx [A]` (i32) of the paged
    /// cache `table [N, H, P, D]`; in place when `table` is donated. The window is a whole row
    /// of the table, the one scatter the TPU compiler keeps as a single kernel: a scatter of
    /// single `[D]` token rows, or of pages with `H` as a batching axis, it turned into a
    /// loop of one index per iteration, four small kernels each (~8.5k estimated cycles a
    /// row; at 70B TP 8 with 128 rows, 83 % of a layer). A table sharded on `H` stays
    /// sharded: `H` is a window axis whole on every chip. Indices that repeat must carry
    /// identical pages: which one lands is unspecified.
    pub fn scatter_pages(&mut self, table: &V, idx: &V, updates: &V) -> V {
        let a = idx.dims()[0];
        let idx2 = self.reshape(idx, &[a, 1]);
        let s = Ty::new(&[], table.ty.elem).mlir();
        let name = self.fresh();
        let (x, y) = (format!("{name}a"), format!("{name}b"));
        self.lines.push(format!(
            "{name} = \"stablehlo.scatter\"({}, {}, {}) ({{\n  ^bb0({x}: {s}, {y}: {s}):\n    \"stablehlo.return\"({y}) : ({s}) -> ()\n  }}) {{scatter_dimension_numbers = #stablehlo.scatter<update_window_dims = [1, 2, 3], inserted_window_dims = [0], scatter_dims_to_operand_dims = [0], index_vector_dim = 1>, indices_are_sorted = false, unique_indices = false}} : ({}, {}, {}) -> {}",
            table.name,
            idx2.name,
            updates.name,
            table.ty.mlir(),
            idx2.ty.mlir(),
            updates.ty.mlir(),
            table.ty.mlir()
        ));
        V {
            name,
            ty: table.ty.clone(),
        }
    }

    /// A GSPMD sharding constraint on an intermediate value.
    pub fn shard(&mut self, a: &V, sharding: &str) -> V {
        let attrs = format!("mhlo.sharding = \"{sharding}\"");
        self.custom_call("Sharding", &[a], &attrs, a.ty.clone())
    }

    /// Binds the loop-carried values of a `while` to fresh names, for the body to use.
    pub fn block_args(&mut self, types: &[Ty]) -> (Vec<V>, String) {
        let vals: Vec<V> = types
            .iter()
            .map(|t| V {
                name: self.fresh(),
                ty: t.clone(),
            })
            .collect();
        let sig = vals
            .iter()
            .map(|v| format!("{}: {}", v.name, v.ty.mlir()))
            .collect::<Vec<_>>()
            .join(", ");
        (vals, sig)
    }

    /// `stablehlo.while` over `init` values: `cond` and `body` are given fresh blocks whose
    /// arguments are the carried values.
    pub fn while_loop(
        &mut self,
        init: &[&V],
        cond: impl FnOnce(&mut Block, &[V]) -> V,
        body: impl FnOnce(&mut Block, &[V]) -> Vec<V>,
    ) -> Vec<V> {
        let types: Vec<Ty> = init.iter().map(|v| v.ty.clone()).collect();
        let name = self.fresh();
        let mut cb = Block::new(&format!("{}c", &name[1..]));
        let (cargs, csig) = cb.block_args(&types);
        let pred = cond(&mut cb, &cargs);
        let mut bb = Block::new(&format!("{}b", &name[1..]));
        let (bargs, bsig) = bb.block_args(&types);
        let outs = body(&mut bb, &bargs);
        assert_eq!(
            outs.len(),
            types.len(),
            "while body must return every carried value"
        );
        let tys = types
            .iter()
            .map(|t| t.mlir())
            .collect::<Vec<_>>()
            .join(", ");
        let out_names = outs
            .iter()
            .map(|v| v.name.clone())
            .collect::<Vec<_>>()
            .join(", ");
        let indent = |lines: Vec<String>| -> String {
            lines
                .iter()
                .flat_map(|l| l.lines().map(|x| format!("    {x}\n")).collect::<Vec<_>>())
                .collect()
        };
        let text = format!(
            "{name}:{} = \"stablehlo.while\"({}) ({{\n  ^bb0({csig}):\n{}    \"stablehlo.return\"({}) : ({}) -> ()\n  }}, {{\n  ^bb0({bsig}):\n{}    \"stablehlo.return\"({out_names}) : ({tys}) -> ()\n  }}) : ({tys}) -> ({tys})",
            types.len(),
            Self::names(init),
            indent(cb.into_lines()),
            pred.name,
            pred.ty.mlir(),
            indent(bb.into_lines()),
        );
        self.lines.push(text);
        types
            .into_iter()
            .enumerate()
            .map(|(i, ty)| V {
                name: format!("{name}#{i}"),
                ty,
            })
            .collect()
    }
}

impl Block {
    /// `stablehlo.if`: both branches are fresh blocks that may use values from this one and
    /// must return values of the same types.
    pub fn if_else(
        &mut self,
        pred: &V,
        then_fn: impl FnOnce(&mut Block) -> Vec<V>,
        else_fn: impl FnOnce(&mut Block) -> Vec<V>,
    ) -> Vec<V> {
        let name = self.fresh();
        let mut tb = Block::new(&format!("{}t", &name[1..]));
        let touts = then_fn(&mut tb);
        let mut eb = Block::new(&format!("{}e", &name[1..]));
        let eouts = else_fn(&mut eb);
        let types: Vec<Ty> = touts.iter().map(|v| v.ty.clone()).collect();
        assert_eq!(
            types,
            eouts.iter().map(|v| v.ty.clone()).collect::<Vec<_>>(),
            "if branches must return the same types"
        );
        let tys = types
            .iter()
            .map(|t| t.mlir())
            .collect::<Vec<_>>()
            .join(", ");
        let ret = |outs: &[V]| {
            format!(
                "\"stablehlo.return\"({}) : ({tys}) -> ()",
                outs.iter()
                    .map(|v| v.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let indent = |lines: Vec<String>| -> String {
            lines
                .iter()
                .flat_map(|l| l.lines().map(|x| format!("    {x}\n")).collect::<Vec<_>>())
                .collect()
        };
        let text = format!(
            "{name}:{} = \"stablehlo.if\"({}) ({{\n{}    {}\n  }}, {{\n{}    {}\n  }}) : ({}) -> ({tys})",
            types.len(),
            pred.name,
            indent(tb.into_lines()),
            ret(&touts),
            indent(eb.into_lines()),
            ret(&eouts),
            pred.ty.mlir(),
        );
        self.lines.push(text);
        types
            .into_iter()
            .enumerate()
            .map(|(i, ty)| V {
                name: format!("{name}#{i}"),
                ty,
            })
            .collect()
    }
}

/// A function argument with its MLIR attributes (sharding, donation).
pub struct Arg {
    pub ty: Ty,
    pub attrs: Vec<String>,
}

/// Prints `module { func.func public @main(...) -> (...) { body; return } }`.
pub fn module(
    name: &str,
    num_partitions: usize,
    args: &[Arg],
    body: impl FnOnce(&mut Block, &[V]) -> Vec<(V, Option<String>)>,
) -> String {
    let mut b = Block::new("v");
    let vals: Vec<V> = args
        .iter()
        .enumerate()
        .map(|(i, a)| V {
            name: format!("%arg{i}"),
            ty: a.ty.clone(),
        })
        .collect();
    let results = body(&mut b, &vals);
    let mut s = String::new();
    writeln!(
        s,
        "module @{name} attributes {{mhlo.num_partitions = {num_partitions} : i32, mhlo.num_replicas = 1 : i32}} {{"
    )
    .expect("write");
    let sig: Vec<String> = args
        .iter()
        .zip(&vals)
        .map(|(a, v)| {
            if a.attrs.is_empty() {
                format!("{}: {}", v.name, a.ty.mlir())
            } else {
                format!("{}: {} {{{}}}", v.name, a.ty.mlir(), a.attrs.join(", "))
            }
        })
        .collect();
    let rets: Vec<String> = results
        .iter()
        .map(|(v, sh)| match sh {
            Some(sh) => format!("{} {{mhlo.sharding = \"{sh}\"}}", v.ty.mlir()),
            None => v.ty.mlir(),
        })
        .collect();
    writeln!(
        s,
        "  func.func public @main({}) -> ({}) {{",
        sig.join(", "),
        rets.join(", ")
    )
    .expect("write");
    for line in b.into_lines() {
        for l in line.lines() {
            writeln!(s, "    {l}").expect("write");
        }
    }
    let names: Vec<String> = results.iter().map(|(v, _)| v.name.clone()).collect();
    let tys: Vec<String> = results.iter().map(|(v, _)| v.ty.mlir()).collect();
    writeln!(s, "    return {} : {}", names.join(", "), tys.join(", ")).expect("write");
    s.push_str("  }\n}\n");
    s
}
