"""simserver.openapi.complete: BentoML's document with what it leaves out declared."""

from __future__ import annotations

from simserver.openapi import TASK_STATUSES, complete

ERR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/InvalidArgument"}}}}
SPEC = {
    "paths": {
        "/{domain}/search": {
            "post": {
                "responses": {"200": {}, "400": ERR, "404": ERR, "500": ERR},
                "requestBody": {
                    "content": {
                        "multipart/form-data": {
                            "schema": {"properties": {"top_k": {"type": "integer", "default": None}}}
                        }
                    }
                },
            }
        },
        "/{domain}/relevance": {"post": {"responses": {"200": {}}}},
        "/{domain}/train/submit": {"post": {"responses": {"200": {"content": {}}}}},
        "/{domain}/train/cancel": {"put": {"responses": {"200": {}}}},
        "/{domain}/images/{item_id}": {
            "get": {"responses": {"200": {}}, "parameters": [{"name": "domain", "in": "path", "schema": {}}]}
        },
        "/livez": {"get": {"responses": {"200": {}}}},
    },
    "components": {
        "schemas": {
            "InvalidArgument": {},
            "TaskStatusResponse": {"properties": {"status": {"enum": ["in_progress", "success"]}}},
        }
    },
}


def test_path_parameters_errors_and_task_shapes_are_declared():
    out = complete(SPEC, ["food", "fashion"], relevance_domains=["nuts"])
    search = out["paths"]["/{domain}/search"]["post"]
    assert search["parameters"][0] == {
        "name": "domain",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": ["fashion", "food"]},
        "description": "a domain of this server (GET /domains)",
    }
    assert set(search["responses"]) == {"200", "400", "401", "403", "404", "409", "411", "413", "500"}
    assert all(
        r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
        for code, r in search["responses"].items()
        if code != "200"
    )
    form = search["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["top_k"]["nullable"] is True
    relevance = out["paths"]["/{domain}/relevance"]["post"]
    assert relevance["parameters"][0]["schema"]["enum"] == ["nuts"]
    assert relevance["responses"]["429"]["headers"]["Retry-After"]
    images = out["paths"]["/{domain}/images/{item_id}"]["get"]["parameters"]
    assert [p["name"] for p in images] == ["domain"] and images[0]["schema"]["enum"] == ["fashion", "food"]
    assert "put" not in out["paths"]["/{domain}/train/cancel"]
    assert out["components"]["schemas"]["TaskStatusResponse"]["properties"]["status"]["enum"] == TASK_STATUSES
    submitted = out["paths"]["/{domain}/train/submit"]["post"]["responses"]["200"]
    assert submitted["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/TaskSubmitted"
    assert out["paths"]["/livez"]["get"]["responses"] == {"200": {}}
    assert "InvalidArgument" not in out["components"]["schemas"]
    assert SPEC["paths"]["/{domain}/search"]["post"]["responses"]["400"] is ERR  # the input is untouched


def test_operations_the_document_dropped_are_added_and_kept_ones_win():
    from simserver.openapi import complete

    post = {"responses": {"200": {}}, "operationId": "add_items"}
    spec = {"paths": {"/{domain}/items": {"get": {"responses": {"200": {}}, "operationId": "list"}}}}
    ops = {"/{domain}/items": {"post": post, "get": {"responses": {}, "operationId": "bento"}}}
    out = complete(spec, ["food"], operations=ops)
    assert set(out["paths"]["/{domain}/items"]) == {"get", "post"}
    assert out["paths"]["/{domain}/items"]["get"]["operationId"] == "list"
    assert out["paths"]["/{domain}/items"]["post"]["operationId"] == "add_items"
    assert "parameters" not in post  # the caller's operations are not modified


def test_allowed_methods_lists_every_documented_method_of_the_most_specific_path():
    from simserver.openapi import AllowedMethods

    doc = {
        "paths": {
            "/{domain}/items": {"get": {}, "post": {}},
            "/{domain}/items/delete": {"post": {}},
            "/{domain}/items/{item_id}": {"get": {}, "delete": {}, "parameters": []},
            "/{domain}/train/cancel": {},
        }
    }
    allow = AllowedMethods(doc)
    assert allow("/food/items") == "GET, POST"
    assert allow("/food/items/delete") == "POST"
    assert allow("/food/items/a/b.jpg") == "DELETE, GET"  # ids may hold slashes
    assert allow("/food/train/cancel") is None
    assert allow("/nowhere") is None
