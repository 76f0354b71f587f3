"""The pure core: the lambda layer's maths as functions of arrays."""
