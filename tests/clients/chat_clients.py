"""databricks-openai, databricks-langchain and langchain-openai, unchanged, against DATABRICKS_HOST.

Run by tests/test_databricks_clients.py with the clients' virtualenv (.venv-clients). ``tooly`` is an
endpoint in front of a loopback provider that calls tools; the rest use the bundled models.
Prints one JSON object of what each client got.
"""

import json
import os

from pydantic import BaseModel

out = {}
chat_model, embedder = "system-smollm2-135m-instruct", "system-all-minilm-l6-v2"
question = "What is the capital of France? Answer in one word."

from databricks_openai import DatabricksOpenAI  # noqa: E402

client = DatabricksOpenAI()
answer = client.chat.completions.create(model=chat_model, messages=[{"role": "user", "content": question}],
                                        max_tokens=8, temperature=0)
out["openai_chat"] = answer.choices[0].message.content
chunks = list(client.chat.completions.create(model=chat_model, messages=[{"role": "user", "content": question}],
                                             max_tokens=8, temperature=0, stream=True))
out["openai_stream"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
out["openai_embeddings"] = [len(d.embedding) for d in client.embeddings.create(model=embedder, input=["a cat", "a dog"]).data]
response = client.responses.create(model=chat_model, input=question, max_output_tokens=8, temperature=0)
out["openai_responses"] = response.output_text

from databricks_langchain import ChatDatabricks, DatabricksEmbeddings  # noqa: E402

llm = ChatDatabricks(endpoint=chat_model, max_tokens=8, temperature=0)
out["langchain_invoke"] = llm.invoke(question).content
out["langchain_stream"] = "".join(chunk.content for chunk in llm.stream(question))


def get_weather(city: str) -> str:
    """The current weather of a city."""
    return "sunny"


class Weather(BaseModel):
    """Ask for the weather of a city."""

    city: str


tooly = ChatDatabricks(endpoint="tooly")
called = tooly.bind_tools([get_weather]).invoke("What is the weather in Paris?")
out["langchain_tool_calls"] = [{"name": c["name"], "args": c["args"]} for c in called.tool_calls]
structured = tooly.with_structured_output(Weather).invoke("What is the weather in Lisbon?")
out["langchain_structured"] = structured.model_dump()
out["langchain_embeddings"] = [len(v) for v in DatabricksEmbeddings(endpoint=embedder).embed_documents(["a cat", "a dog"])]

from langchain_openai import ChatOpenAI  # noqa: E402

plain = ChatOpenAI(base_url=os.environ["DATABRICKS_HOST"] + "/serving-endpoints", api_key=os.environ["DATABRICKS_TOKEN"],
                   model=chat_model, max_tokens=8, temperature=0)
out["langchain_openai_invoke"] = plain.invoke(question).content
out["langchain_openai_tools"] = [c["name"] for c in ChatOpenAI(
    base_url=os.environ["DATABRICKS_HOST"] + "/serving-endpoints", api_key=os.environ["DATABRICKS_TOKEN"],
    model="tooly").bind_tools([get_weather]).invoke("What is the weather in Rome?").tool_calls]
print(json.dumps(out))
