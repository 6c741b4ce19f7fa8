"""Run by tests/test_sharded.py under torchrun (2 gloo ranks): does torch.func.grad differentiate through DTensors?

Prints one line per attempt, "<name> ok" or "<name> fails: <error>": the smallest examples
behind the sharded-step design in docs/distributed.md. When a torch release makes them
pass, the sharded step can gather layer by layer inside the differentiated function.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor


def attempt(name, fn):
    try:
        fn()
        print(f"{name} ok", flush=True)
    except Exception as e:  # noqa: BLE001 -- the point is to report it
        print(f"{name} fails: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    w = distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)])
    attempt("func.grad over a DTensor weight", lambda: torch.func.grad(lambda w: F.linear(x, w).sum())(w))
    attempt("func.grad through DTensor.full_tensor",
            lambda: torch.func.grad(lambda w: F.linear(x, w.full_tensor()).sum())(w))
    leaf = w.detach().requires_grad_()
    attempt("autograd.grad through DTensor.full_tensor (not torch.func)",
            lambda: torch.autograd.grad(F.linear(x, leaf.full_tensor()).sum(), leaf))
    local = w.to_local()
    attempt("func.grad through all_gather_single",
            lambda: torch.func.grad(lambda v: (x @ funcol.all_gather_single(v, 0, mesh.get_group()).T).sum())(local))
    dist.barrier()  # no rank closes its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
