"""The sample fleet database the demo, the benchmark and the tests build."""
