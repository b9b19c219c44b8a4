"""The model server: POST /predict through a dynamic batcher to an inference backend."""
