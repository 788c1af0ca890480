"""Where records come from and where outputs go: Kafka sources and sinks for kafka-python and
confluent-kafka, the retry policy they share, the wire schemas, and the embedded broker.
"""
