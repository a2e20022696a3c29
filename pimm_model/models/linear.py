"""Linear reference: a logistic regression per task on the same features as every deep model.

    x (B, F*D) -> logit_t = w_t · x + b_t                    (B, T), one linear layer for all tasks

Every head reads the concatenated field embeddings x = [e_1(id_1); ...; e_F(id_F)], so task t's score is
sum_f W_{t,f} e_f(id_f) + b_t: task t's weight of an id of field f is W_{t,f} · e_f(id). That is the classic
"one weight per id, summed, plus a bias" logistic regression of every task, with one caveat the embedding size
decides, because the tables are shared by the tasks:

* ``model.embedding_dim >= T`` (the preset ``launch/configs/linear.yaml`` uses 4, enough for chains of up to 4
  tasks): the per-task weight tables
  E_f W_f^T can be any (ids x T) matrix, so the model class is exactly T independent logistic regressions
  (task t can read its own coordinate of a D = T embedding), only parameterised as a product.
* ``model.embedding_dim = 1``: the literal "dim-1 embeddings summed plus a bias" for ONE task; with T > 1 tasks all
  tasks share the per-id weight up to one scale per (task, field), a rank-1 coupling of the tasks.

``model.linear_chain_factorised = true`` reads the T linear scores as the conditionals
q_t = P(y_t = 1 | y_{t-1} = 1, x) and returns the marginals p_t = prod_{s<=t} q_s (stable, as in ESMM), trained,
like every model here, by the per-task BCE of the marginals over the entire space: an ESMM with linear towers.
The alternative reading, training each conditional by BCE only on the rows with y_{t-1} = 1 (the masked conditional
likelihood, which under chain labels is the joint likelihood), needs a loss other than the entire-space BCE that the
trainer applies to the returned logits; it is left out so that every model is trained and evaluated on the same
objective.
"""

from typing import Optional

from torch import Tensor, nn

from pimm_model.config import ModelConfig
from pimm_model.layers import chain_marginal_logits
from pimm_model.registry import register_model


class LinearHead(nn.Module):
    """Per-task logistic regression on the concatenated embeddings, optionally chain-factorised.

    Args:
        in_dim: width of the concatenated field embeddings (F*D).
        num_tasks: number of tasks T.
        chain_factorised: read the linear scores as conditionals and return the chain product's logits.

    Example:
        head = LinearHead(15, 3, chain_factorised=False)
        logits = head(torch.randn(8, 15))  # (8, 3)
    """

    def __init__(self, in_dim: int, num_tasks: int, chain_factorised: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, num_tasks)  # row t: w_t, bias b_t
        self.chain_factorised = chain_factorised

    def forward(self, x: Tensor, labels: Optional[Tensor] = None, p: float = 0.0) -> Tensor:
        """Args:
            x: (B, in_dim) concatenated field embeddings.
            labels: unused.
            p: unused.

        Returns:
            logits (B, T): of each task's marginal directly, or of the chain product of the conditionals.
        """
        scores = self.linear(x)  # (B, T)  w_t · x + b_t
        if self.chain_factorised:
            return chain_marginal_logits(scores)  # (B, T)  logit(prod_{s<=t} sigmoid(score_s)), fp32
        return scores  # (B, T)


@register_model("linear")
def build_linear(cfg: ModelConfig, in_dim: int, num_tasks: int) -> nn.Module:
    return LinearHead(in_dim, num_tasks, cfg.linear_chain_factorised)
