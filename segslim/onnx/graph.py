"""A mutable view of an ONNX graph (initializers by name, producers and consumers, written
back in topological order) and the ranges of its tensors on calibration images."""
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    from onnx import NodeProto


def producers_of(nodes: Iterable['NodeProto']) -> Dict[str, 'NodeProto']:
    """{tensor: the node that writes it} of ONNX nodes."""
    return {name: node for node in nodes for name in node.output}


def readers_of(nodes: Iterable['NodeProto']) -> Dict[str, List['NodeProto']]:
    """{tensor: the nodes that read it} of ONNX nodes (each node once per tensor)."""
    found: Dict[str, List[NodeProto]] = {}
    for node in nodes:
        for name in dict.fromkeys(node.input):
            found.setdefault(name, []).append(node)
    return found


def redirect(old: str, new: str, users: Iterable['NodeProto']) -> None:
    """Points every input of `users` that reads `old` at `new`."""
    for node in users:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


class GraphError(Exception):
    """onnxruntime cannot run the float graph (e.g. a converter's op at a dynamic size)."""


class Graph:
    """A mutable view of an ONNX graph: initializers by name, producers and consumers."""

    def __init__(self, model: Any):
        from onnx import numpy_helper
        self.model = model
        self.g = model.graph
        self.nh = numpy_helper
        self.inits: Dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t)
                                             for t in self.g.initializer}
        keep = []
        for node in self.g.node:  # paddle2onnx writes parameters as Constant nodes
            value = [a for a in node.attribute if a.name == 'value']
            if node.op_type == 'Constant' and value:
                self.inits[node.output[0]] = numpy_helper.to_array(value[0].t)
            else:
                keep.append(node)
        self.nodes: List[Any] = keep
        self.counter = 0
        self.origin: Dict[str, str] = {}  # new initializer -> the parameter it was made from

    def consumers(self, name: str) -> List[Any]:
        return [n for n in self.nodes if name in n.input]

    def readers(self) -> Dict[str, List[Any]]:
        """{tensor: the nodes that read it} now (a snapshot: edits after it are not in it)."""
        return readers_of(self.nodes)

    def producers(self) -> Dict[str, 'NodeProto']:
        """{tensor: the node that writes it} now (a snapshot)."""
        return producers_of(self.nodes)

    def is_output(self, name: str) -> bool:
        return any(o.name == name for o in self.g.output)

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f'{base}_{self.counter}'

    def add_init(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits[name] = value
        self.origin[name] = self.origin.get(base, base)
        return name

    def sole_consumer(self, name: str, op_type: str,
                      readers: Optional[Dict[str, List[Any]]] = None) -> Optional[Any]:
        """The one node that reads tensor `name` when it is an `op_type` and the tensor is no
        graph output, else None (`readers`: a snapshot to look it up in)."""
        users = readers.get(name, []) if readers is not None else self.consumers(name)
        if len(users) == 1 and users[0].op_type == op_type and not self.is_output(name):
            return users[0]
        return None

    def insert_qdq(self, tensor: str, scale: float, zero_point: int, dtype: Any,
                   users: Sequence[Any]) -> str:
        """Inserts QuantizeLinear -> DequantizeLinear after `tensor` and points `users` at
        the dequantized tensor; returns its name."""
        from onnx import helper
        s = self.add_init(tensor + '.scale', np.array(scale, np.float32))
        z = self.add_init(tensor + '.zero_point', np.array(zero_point, dtype))
        quantized, restored = self.fresh(tensor + '.q'), self.fresh(tensor + '.dq')
        # a Shape reads the uint8 tensor: no dequantize is computed for it alone
        redirect(tensor, quantized, [u for u in users if u.op_type == 'Shape'])
        redirect(tensor, restored, [u for u in users if u.op_type != 'Shape'])
        self.nodes.append(helper.make_node('QuantizeLinear', [tensor, s, z], [quantized],
                                           name=quantized))
        self.nodes.append(helper.make_node('DequantizeLinear', [quantized, s, z], [restored],
                                           name=restored))
        return restored

    def finish(self) -> Any:
        """Writes nodes (topologically sorted) and the used initializers back."""
        used = {name for n in self.nodes for name in n.input}
        del self.g.initializer[:]
        self.g.initializer.extend(self.nh.from_array(np.asarray(v), k)
                                  for k, v in sorted(self.inits.items()) if k in used)
        known = {i.name for i in self.g.input} | set(self.inits) | {''}
        waiting = {id(n): sum(1 for i in set(n.input) if i not in known) for n in self.nodes}
        readers = self.readers()
        ordered = [n for n in self.nodes if not waiting[id(n)]]
        for node in ordered:  # Kahn's order: grows while it is walked
            for out in node.output:
                for user in readers.get(out, []):
                    waiting[id(user)] -= 1
                    if not waiting[id(user)]:
                        ordered.append(user)
        if len(ordered) != len(self.nodes):
            raise ValueError('the ONNX graph has a cycle or an undefined input')
        del self.g.node[:]
        self.g.node.extend(ordered)
        del self.g.value_info[:]
        return self.model


def tensor_ranges(g: Graph, names: Sequence[str], batches: Sequence[np.ndarray]
                  ) -> Dict[str, Tuple[float, float]]:
    """(min, max) of each named tensor of the float graph over the batches (onnxruntime)."""
    try:
        import onnxruntime
    except ImportError:
        return {}
    import copy

    from onnx import TensorProto, helper
    probe = copy.deepcopy(g.model)
    view = Graph(probe)
    view.nodes = [copy.deepcopy(n) for n in g.nodes]
    view.inits = g.inits
    view.finish()
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names)
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    found: Dict[str, Tuple[float, float]] = {}
    try:
        session = onnxruntime.InferenceSession(probe.SerializeToString(), options,
                                               providers=['CPUExecutionProvider'])
        input_name = session.get_inputs()[0].name
        for batch in batches:  # reduced batch by batch: memory does not grow with them
            for name, value in zip(names, session.run(names, {input_name: batch})):
                low, high = float(value.min()), float(value.max())
                old = found.get(name, (low, high))
                found[name] = (min(old[0], low), max(old[1], high))
    except Exception as e:  # onnxruntime raises its own generic errors
        raise GraphError(str(e).strip().splitlines()[-1][:200]) from e
    return found
