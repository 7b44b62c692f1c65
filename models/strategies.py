"""Lightning strategies used by `configs/trainer/`."""

from lightning.pytorch import strategies
from torch import nn
from torch.nn.parallel import DistributedDataParallel


class DDPStrategy(strategies.DDPStrategy):
    """Lightning's `DDPStrategy`, with the DDP wrapper built on the current CUDA stream.

    Lightning 2.6 builds it under a new side stream (which only whole-network CUDA-graph capture needs),
    so DDP's AccumulateGrad nodes belong to that stream while every backward runs on the default one:
    each step then synchronizes the two for every parameter, and torch warns "The AccumulateGrad node's
    stream does not match the stream of the node that produced the incoming gradient".
    """

    def _setup_model(self, model: nn.Module) -> DistributedDataParallel:
        return DistributedDataParallel(
            module=model, device_ids=self.determine_ddp_device_ids(), **self._ddp_kwargs
        )
