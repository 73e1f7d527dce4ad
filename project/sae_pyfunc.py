"""MLflow "model from code" for a registered SAE.

MLflow executes this file when it loads the model, so no Python object is ever pickled: the
weights are the SAELens-format directory logged as the artifact ``sae`` and read with
safetensors. ``predict(activations [N, d_in]) -> latents [N, d_sae]``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch

from project.saes import load_sae_dir


class SAEPyfuncModel(mlflow.pyfunc.PythonModel):
    """Encode residual-stream activations into SAE latents."""

    def load_context(self, context: Any) -> None:
        self.sae = load_sae_dir(context.artifacts["sae"]).eval()

    # No type hints here on purpose: MLflow would try to derive a schema from them; the
    # registered version carries an explicit tensor signature instead.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        if hasattr(model_input, "to_numpy"):  # a pandas DataFrame, one column per input dim
            model_input = model_input.to_numpy()
        acts = torch.as_tensor(np.asarray(model_input), dtype=torch.float32)
        with torch.inference_mode():
            return self.sae.encode(acts).numpy()


mlflow.models.set_model(SAEPyfuncModel())
