"""Evaluation bookkeeping on N processes, with a stand-in for accelerate's collectives (the launched two-process runs
are in test_skipped_images)."""

from types import SimpleNamespace

import pytest
import torch

from training.evaluation import EvaluationTally, fill_rows, rows_kept_by_gather


class TwoProcesses:
    """Process `process_index` of two with the same rows; its last batch is padded so that `remainder` rows count."""

    def __init__(self, process_index: int, end_of_dataloader: bool, remainder: int = -1):
        self.process_index, self.device, self.gathers = process_index, torch.device("cpu"), 0
        self.gradient_state = SimpleNamespace(end_of_dataloader=end_of_dataloader, remainder=remainder)

    def gather_for_metrics(self, tensor: torch.Tensor) -> torch.Tensor:
        self.gathers += 1
        gathered = torch.cat([tensor, tensor])
        return gathered[: self.gradient_state.remainder] if self.gradient_state.end_of_dataloader else gathered

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        return tensor * 2


def test_rows_are_all_kept_without_a_gather_before_the_last_batch():
    accelerator = TwoProcesses(1, end_of_dataloader=False)
    assert rows_kept_by_gather(accelerator, 4, torch.device("cpu")).tolist() == [True] * 4
    assert accelerator.gathers == 0


@pytest.mark.parametrize(("process_index", "kept"), [(0, [True] * 4), (1, [True, False, False, False])])
def test_the_last_batch_keeps_the_rows_before_the_padding(process_index, kept):
    accelerator = TwoProcesses(process_index, end_of_dataloader=True, remainder=5)  # 4 + 1 real rows, 3 repeated
    assert rows_kept_by_gather(accelerator, 4, torch.device("cpu")).tolist() == kept
    assert accelerator.gathers == 1


def test_the_tally_counts_kept_rows_and_averages_the_loss_over_decoded_images_of_all_processes():
    tally = EvaluationTally()
    # batch 1: 3 of 4 rows decoded (mean loss 2.0); batch 2: 1 decoded, 1 skipped, 2 repeated rows (mean loss 4.0)
    tally.add(torch.tensor(2.0), torch.tensor([True, True, False, True]), torch.ones(4, dtype=torch.bool))
    tally.add(torch.tensor(4.0), torch.tensor([True, False, False, False]), torch.tensor([True, True, False, False]))
    metrics = tally.take(TwoProcesses(0, end_of_dataloader=True), "eval")
    assert metrics == {"eval_images": 8, "eval_skipped_images": 4, "eval_loss": pytest.approx((2 * 3 + 4) / 4)}
    # the next evaluation starts from nothing, and a process without a batch still joins the reduction
    assert tally.take(TwoProcesses(1, end_of_dataloader=True), "eval") == {"eval_images": 0, "eval_skipped_images": 0}


def test_outputs_go_back_to_their_rows_and_the_other_rows_are_zero():
    rows = torch.tensor([False, True, False, True])
    filled = fill_rows((torch.tensor([[1.0, 2.0], [3.0, 4.0]]),), rows)[0]
    assert filled.tolist() == [[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 4.0]]
