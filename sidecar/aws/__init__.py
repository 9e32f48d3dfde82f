"""The AWS edge: the botocore gateway, region resolution and error classification."""
