"""FaaSTube: GPU-efficient data passing for serverless inference workflows."""
