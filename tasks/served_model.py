"""The code of the registered pyfunc model, logged as MLflow "models from code": MLflow keeps
this file beside the model directory and runs it to rebuild the model, so no Python object is
pickled into the registry. It imports tinyseek, which is installed where the model is served
(`--env-manager local`)."""

from mlflow.models import set_model

from tasks.register import TinyseekModel

set_model(TinyseekModel())
