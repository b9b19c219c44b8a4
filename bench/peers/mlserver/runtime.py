"""The model on MLServer, as its custom-runtime docs show: an MLModel with load and predict."""

from __future__ import annotations

from mlserver import MLModel
from mlserver.codecs import Base64Codec
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from peer_model import TOP, Classifier  # bench/peers/, on PYTHONPATH


class MobileNet(MLModel):
    async def load(self) -> bool:
        self.classifier = Classifier(self.settings.parameters.uri)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        # base64 strings, marked "content_type": "base64" or not
        images = self.decode(payload.inputs[0], default_codec=Base64Codec)
        rows = [label for image in images for label in self.classifier.top5(image)]
        output = ResponseOutput(name="probs", shape=[len(images), TOP], datatype="BYTES", data=rows)
        return InferenceResponse(model_name=self.name, outputs=[output], id=payload.id)
