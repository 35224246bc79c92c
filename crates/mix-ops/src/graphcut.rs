//! Exact min-cut / max-flow (Dinic) and multi-label α-β-swap labelling on a
//! 4-connected grid, as needed by PuzzleMix (spec §5.9.4).
//!
//! Graphs are tiny (≤ 256 sites plus two terminals) but many (PuzzleMix solves several per
//! sample and step), so the solver is plain Dinic over flat arrays. All capacities and energies
//! are integers (`i64`), like the quantized energies of the reference (GCO), so moves are exact
//! and the swap loop terminates.
//!
//! Where a move has several minimizers, the one chosen is GCO's (v3, as wrapped by
//! `gco-wrapper`): its max-flow labels a variable 1 only when it can still reach the sink in
//! the residual network, so a site takes the larger label of a swap only when every
//! minimizing move gives it that label. The swap loop also applies every move, improving or not,
//! as GCO does. Later moves start from the labelling a tie produced, so both rules can change
//! the final labelling and even its energy.

/// A directed flow network with integer capacities, solved with Dinic's algorithm.
///
/// Arcs live in flat arrays and the per-node arc lists in one compressed array built when the
/// flow is solved: PuzzleMix solves thousands of these small networks per step, and one
/// allocation per node (a `Vec` of arcs each) cost as much as the flow itself.
#[derive(Debug, Clone)]
pub struct FlowNetwork {
    num_nodes: usize,
    /// Head node of each arc; arcs come in pairs `(2k, 2k+1)` = arc and its reverse.
    head: Vec<usize>,
    /// Residual capacity of each arc.
    residual: Vec<i64>,
    /// The arcs leaving node `u` are `adjacency[first[u]..first[u + 1]]`, in the order they
    /// were added; rebuilt by [`FlowNetwork::max_flow`] when arcs were added since.
    first: Vec<usize>,
    adjacency: Vec<usize>,
}

impl FlowNetwork {
    /// An empty network on `num_nodes` nodes.
    pub fn new(num_nodes: usize) -> Self {
        Self {
            num_nodes,
            head: Vec::new(),
            residual: Vec::new(),
            first: Vec::new(),
            adjacency: Vec::new(),
        }
    }

    /// An empty network on `num_nodes` nodes with room for `edges` calls of
    /// [`FlowNetwork::add_edge`].
    pub fn with_capacity(num_nodes: usize, edges: usize) -> Self {
        Self {
            num_nodes,
            head: Vec::with_capacity(2 * edges),
            residual: Vec::with_capacity(2 * edges),
            first: Vec::with_capacity(num_nodes + 1),
            adjacency: Vec::with_capacity(2 * edges),
        }
    }

    /// Number of nodes.
    pub fn num_nodes(&self) -> usize {
        self.num_nodes
    }

    /// Adds the arc `from → to` with capacity `cap` and the reverse arc `to → from`
    /// with capacity `reverse_cap` (0 for a plain directed arc).
    ///
    /// # Panics
    /// If a node is out of range or a capacity is negative (a bug in the caller).
    pub fn add_edge(&mut self, from: usize, to: usize, cap: i64, reverse_cap: i64) {
        assert!(
            from < self.num_nodes() && to < self.num_nodes(),
            "node out of range"
        );
        assert!(
            cap >= 0 && reverse_cap >= 0,
            "capacities must be non-negative"
        );
        self.head.push(to);
        self.residual.push(cap);
        self.head.push(from);
        self.residual.push(reverse_cap);
    }

    /// Whether the arc lists cover every arc added so far.
    fn adjacency_is_current(&self) -> bool {
        self.first.len() == self.num_nodes + 1 && self.adjacency.len() == self.head.len()
    }

    /// Groups the arc ids by tail node (a counting sort, so each node keeps its arcs in
    /// insertion order). The tail of arc `a` is the head of its pair `a ^ 1`.
    fn build_adjacency(&mut self) {
        let n = self.num_nodes;
        self.first.clear();
        self.first.resize(n + 1, 0);
        for arc in 0..self.head.len() {
            self.first[self.head[arc ^ 1] + 1] += 1;
        }
        for u in 0..n {
            self.first[u + 1] += self.first[u];
        }
        let mut fill = self.first[..n].to_vec();
        self.adjacency.clear();
        self.adjacency.resize(self.head.len(), 0);
        for arc in 0..self.head.len() {
            let tail = self.head[arc ^ 1];
            self.adjacency[fill[tail]] = arc;
            fill[tail] += 1;
        }
    }

    /// The arcs leaving `u` (the arc lists must be current).
    fn arcs(&self, u: usize) -> &[usize] {
        &self.adjacency[self.first[u]..self.first[u + 1]]
    }

    /// Pushes a maximum flow from `source` to `sink` and returns its value. The
    /// network keeps the residual capacities, so [`FlowNetwork::source_side`]
    /// afterwards gives a minimum cut.
    pub fn max_flow(&mut self, source: usize, sink: usize) -> i64 {
        assert_ne!(source, sink, "source and sink must differ");
        if !self.adjacency_is_current() {
            self.build_adjacency();
        }
        let n = self.num_nodes();
        let mut total = 0i64;
        let mut level = vec![usize::MAX; n];
        let mut next_arc = vec![0usize; n];
        let mut queue = Vec::with_capacity(n);
        loop {
            if !self.bfs_levels(source, sink, &mut level, &mut queue) {
                return total;
            }
            next_arc.copy_from_slice(&self.first[..n]);
            loop {
                let pushed = self.push_blocking(source, sink, i64::MAX, &level, &mut next_arc);
                if pushed == 0 {
                    break;
                }
                total += pushed;
            }
        }
    }

    /// Nodes reachable from `source` in the residual network (the source side of
    /// a minimum cut once [`FlowNetwork::max_flow`] has run).
    pub fn source_side(&self, source: usize) -> Vec<bool> {
        if !self.adjacency_is_current() {
            let mut fresh = self.clone();
            fresh.build_adjacency();
            return fresh.source_side(source);
        }
        let mut seen = vec![false; self.num_nodes()];
        let mut queue = vec![source];
        seen[source] = true;
        let mut next = 0;
        while let Some(&u) = queue.get(next) {
            next += 1;
            for &arc in self.arcs(u) {
                let v = self.head[arc];
                if self.residual[arc] > 0 && !seen[v] {
                    seen[v] = true;
                    queue.push(v);
                }
            }
        }
        seen
    }

    /// Nodes from which `sink` is reachable in the residual network. Once
    /// [`FlowNetwork::max_flow`] has run, these are the nodes on the sink side of *every*
    /// minimum cut (the smallest sink side), whatever maximum flow was found.
    pub fn sink_side(&self, sink: usize) -> Vec<bool> {
        if !self.adjacency_is_current() {
            let mut fresh = self.clone();
            fresh.build_adjacency();
            return fresh.sink_side(sink);
        }
        let mut seen = vec![false; self.num_nodes()];
        let mut queue = vec![sink];
        seen[sink] = true;
        let mut next = 0;
        while let Some(&v) = queue.get(next) {
            next += 1;
            // Arc `a` leaves `v`; its pair `a ^ 1` enters `v` from `head[a]`.
            for &arc in self.arcs(v) {
                let u = self.head[arc];
                if self.residual[arc ^ 1] > 0 && !seen[u] {
                    seen[u] = true;
                    queue.push(u);
                }
            }
        }
        seen
    }

    /// Breadth-first levels from `source` over arcs with residual capacity; whether the
    /// sink is reachable. `queue` is scratch space.
    fn bfs_levels(
        &self,
        source: usize,
        sink: usize,
        level: &mut [usize],
        queue: &mut Vec<usize>,
    ) -> bool {
        level.iter_mut().for_each(|l| *l = usize::MAX);
        level[source] = 0;
        queue.clear();
        queue.push(source);
        let mut next = 0;
        while let Some(&u) = queue.get(next) {
            next += 1;
            for &arc in self.arcs(u) {
                let v = self.head[arc];
                if self.residual[arc] > 0 && level[v] == usize::MAX {
                    level[v] = level[u] + 1;
                    queue.push(v);
                }
            }
        }
        level[sink] != usize::MAX
    }

    /// One augmenting path in the level graph (depth ≤ number of nodes, so the
    /// recursion stays shallow for the graphs used here). `next_arc[u]` is the position in
    /// `adjacency` of the next arc of `u` to try.
    fn push_blocking(
        &mut self,
        u: usize,
        sink: usize,
        limit: i64,
        level: &[usize],
        next_arc: &mut [usize],
    ) -> i64 {
        if u == sink {
            return limit;
        }
        while next_arc[u] < self.first[u + 1] {
            let arc = self.adjacency[next_arc[u]];
            let v = self.head[arc];
            if self.residual[arc] > 0 && level[v] == level[u] + 1 {
                let pushed =
                    self.push_blocking(v, sink, limit.min(self.residual[arc]), level, next_arc);
                if pushed > 0 {
                    self.residual[arc] -= pushed;
                    self.residual[arc ^ 1] += pushed;
                    return pushed;
                }
            }
            next_arc[u] += 1;
        }
        0
    }
}

/// Minimizes a submodular binary energy
/// `E(x) = Σ_s unary[s][x_s] + Σ_(s,t,w) w·[x_s ≠ x_t]` (`w ≥ 0`) exactly by one
/// min-cut. Returns the minimizing `x` (`false` = label 0) and its energy.
///
/// Of several minimizers it returns the one with the fewest `true`s, as GCO does: `x_s` is
/// `true` only when every minimizer sets it (the minimizers of a submodular energy are closed
/// under intersection, so that labelling is itself a minimizer).
pub fn minimize_binary(unary: &[[i64; 2]], pairs: &[(usize, usize, i64)]) -> (Vec<bool>, i64) {
    let n = unary.len();
    let (source, sink) = (n, n + 1);
    let mut net = FlowNetwork::with_capacity(n + 2, 2 * n + pairs.len());
    let mut constant = 0i64;
    // Source side = label 0: a site on the sink side cuts `source → s` (pays
    // unary[s][1]); a site on the source side cuts `s → sink` (pays unary[s][0]).
    for (s, u) in unary.iter().enumerate() {
        let base = u[0].min(u[1]);
        constant += base;
        if u[1] > base {
            net.add_edge(source, s, u[1] - base, 0);
        }
        if u[0] > base {
            net.add_edge(s, sink, u[0] - base, 0);
        }
    }
    for &(s, t, w) in pairs {
        assert!(w >= 0, "binary pairwise weights must be non-negative");
        if w > 0 {
            net.add_edge(s, t, w, w);
        }
    }
    let flow = net.max_flow(source, sink);
    let mut labels = net.sink_side(sink);
    labels.truncate(n);
    (labels, constant + flow)
}

/// A multi-label energy on a `rows × cols` 4-connected grid:
/// `E(l) = Σ_s data[s][l_s] + Σ_vertical wv·V[l_s][l_t] + Σ_horizontal wh·V[l_s][l_t]`.
#[derive(Debug, Clone)]
pub struct GridEnergy {
    /// Grid height.
    pub rows: usize,
    /// Grid width.
    pub cols: usize,
    /// Number of labels.
    pub num_labels: usize,
    /// Data costs, `rows·cols·num_labels`, site-major (`(r·cols + c)·num_labels + l`).
    pub data: Vec<i64>,
    /// Label costs `V`, `num_labels²`, symmetric, zero on the diagonal, non-negative.
    pub label_cost: Vec<i64>,
    /// Weights of the edges `(r,c)–(r+1,c)`, `(rows−1)·cols`, row-major, non-negative.
    pub vertical: Vec<i64>,
    /// Weights of the edges `(r,c)–(r,c+1)`, `rows·(cols−1)`, row-major, non-negative.
    pub horizontal: Vec<i64>,
}

impl GridEnergy {
    /// Checks sizes and the semi-metric / non-negativity conditions the swap move needs.
    pub fn validate(&self) -> Result<(), String> {
        let sites = self.rows * self.cols;
        let l = self.num_labels;
        if l < 2 {
            return Err(format!("grid energy: need ≥ 2 labels, got {l}"));
        }
        if self.data.len() != sites * l {
            return Err(format!(
                "grid energy: data has {} entries, expected {}",
                self.data.len(),
                sites * l
            ));
        }
        if self.label_cost.len() != l * l {
            return Err(format!(
                "grid energy: label_cost has {} entries, expected {}",
                self.label_cost.len(),
                l * l
            ));
        }
        if self.vertical.len() != self.rows.saturating_sub(1) * self.cols
            || self.horizontal.len() != self.rows * self.cols.saturating_sub(1)
        {
            return Err("grid energy: edge weight arrays have the wrong size".into());
        }
        for a in 0..l {
            if self.label_cost[a * l + a] != 0 {
                return Err("grid energy: label_cost must be zero on the diagonal".into());
            }
            for b in 0..l {
                let v = self.label_cost[a * l + b];
                if v < 0 || v != self.label_cost[b * l + a] {
                    return Err("grid energy: label_cost must be symmetric and ≥ 0".into());
                }
            }
        }
        if self.vertical.iter().chain(&self.horizontal).any(|&w| w < 0) {
            return Err("grid energy: edge weights must be ≥ 0".into());
        }
        Ok(())
    }

    /// All grid edges as `(site, site, weight)`.
    fn edges(&self) -> impl Iterator<Item = (usize, usize, i64)> + '_ {
        let cols = self.cols;
        let vertical = self.vertical.iter().enumerate().map(move |(i, &w)| {
            let (r, c) = (i / cols, i % cols);
            (r * cols + c, (r + 1) * cols + c, w)
        });
        let hcols = cols.saturating_sub(1);
        let horizontal = self.horizontal.iter().enumerate().map(move |(i, &w)| {
            let (r, c) = (i / hcols, i % hcols);
            (r * cols + c, r * cols + c + 1, w)
        });
        vertical.chain(horizontal)
    }

    /// `E(labels)`.
    pub fn energy(&self, labels: &[usize]) -> i64 {
        let l = self.num_labels;
        let data: i64 = labels
            .iter()
            .enumerate()
            .map(|(s, &ls)| self.data[s * l + ls])
            .sum();
        let smooth: i64 = self
            .edges()
            .map(|(s, t, w)| w * self.label_cost[labels[s] * l + labels[t]])
            .sum();
        data + smooth
    }

    /// The optimal α-β swap move: relabels the sites currently holding `a` or `b`
    /// with whichever of `a`/`b` minimizes the energy, all other sites fixed.
    /// Returns the proposed labelling and its energy (never above the current one).
    /// Among equal-energy moves, a site gets `b` only when every one of them gives it `b`
    /// (see [`minimize_binary`]); with `a < b` that is GCO's rule of keeping tied sites on the
    /// smaller label.
    pub fn best_swap(&self, labels: &[usize], a: usize, b: usize) -> (Vec<usize>, i64) {
        let l = self.num_labels;
        let sites = self.rows * self.cols;
        let mut var_of = vec![usize::MAX; sites];
        let mut members = Vec::new();
        for (s, &ls) in labels.iter().enumerate() {
            if ls == a || ls == b {
                var_of[s] = members.len();
                members.push(s);
            }
        }
        let mut unary: Vec<[i64; 2]> = members
            .iter()
            .map(|&s| [self.data[s * l + a], self.data[s * l + b]])
            .collect();
        let mut pairs = Vec::new();
        let mut fixed_energy = 0i64;
        for (s, t, w) in self.edges() {
            match (var_of[s], var_of[t]) {
                (usize::MAX, usize::MAX) => {
                    fixed_energy += w * self.label_cost[labels[s] * l + labels[t]];
                }
                (vs, usize::MAX) => {
                    unary[vs][0] += w * self.label_cost[a * l + labels[t]];
                    unary[vs][1] += w * self.label_cost[b * l + labels[t]];
                }
                (usize::MAX, vt) => {
                    unary[vt][0] += w * self.label_cost[labels[s] * l + a];
                    unary[vt][1] += w * self.label_cost[labels[s] * l + b];
                }
                (vs, vt) => pairs.push((vs, vt, w * self.label_cost[a * l + b])),
            }
        }
        for (s, &ls) in labels.iter().enumerate() {
            if var_of[s] == usize::MAX {
                fixed_energy += self.data[s * l + ls];
            }
        }
        let (choice, moved_energy) = minimize_binary(&unary, &pairs);
        let mut proposal = labels.to_vec();
        for (v, &s) in members.iter().enumerate() {
            proposal[s] = if choice[v] { b } else { a };
        }
        (proposal, fixed_energy + moved_energy)
    }

    /// α-β-swap minimization from `initial`, with GCO's `swap(-1)` rules: each cycle
    /// visits the label pairs `(a, b)` for `a = 0..L` and `b = L−1` down to `a+1`
    /// (for 3 labels: (0,2), (0,1), (1,2)) and applies every [`GridEnergy::best_swap`] move,
    /// also those that leave the energy unchanged (they can move tied sites to `a`); it stops
    /// after a cycle that ends without a lower energy than it started with.
    pub fn alpha_beta_swap(&self, initial: &[usize]) -> Vec<usize> {
        let l = self.num_labels;
        let mut labels = initial.to_vec();
        let mut energy = self.energy(&labels);
        loop {
            let cycle_start = energy;
            for a in 0..l {
                for b in (a + 1..l).rev() {
                    (labels, energy) = self.best_swap(&labels, a, b);
                }
            }
            if energy >= cycle_start {
                return labels;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_energy_matches_brute_force_small() {
        let unary = [[3, 1], [0, 4], [2, 2]];
        let pairs = [(0, 1, 2), (1, 2, 5)];
        let (x, e) = minimize_binary(&unary, &pairs);
        let energy = |x: &[bool]| -> i64 {
            let u: i64 = (0..3).map(|s| unary[s][x[s] as usize]).sum();
            let p: i64 = pairs
                .iter()
                .map(|&(s, t, w)| if x[s] != x[t] { w } else { 0 })
                .sum();
            u + p
        };
        let best = (0..8u32)
            .map(|m| energy(&[(m & 1) != 0, (m & 2) != 0, (m & 4) != 0]))
            .min()
            .unwrap();
        assert_eq!(e, best);
        assert_eq!(energy(&x), e);
    }
}
