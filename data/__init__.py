"""The data contract and the embedded MNIST sample."""
