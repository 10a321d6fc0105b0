"""Operator tools: the audit (`tickpipe audit`) and the dead-letter commands (`tickpipe dlq`)."""
