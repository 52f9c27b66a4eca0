from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Money(_message.Message):
    __slots__ = ("micros", "amount", "currency")
    MICROS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    micros: int
    amount: str
    currency: str
    def __init__(self, micros: _Optional[int] = ..., amount: _Optional[str] = ..., currency: _Optional[str] = ...) -> None: ...

class InvoiceRequest(_message.Message):
    __slots__ = ("account", "period")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    account: str
    period: str
    def __init__(self, account: _Optional[str] = ..., period: _Optional[str] = ...) -> None: ...

class InvoiceLine(_message.Message):
    __slots__ = ("module", "item", "plan", "quantity", "unit", "unit_price", "amount", "transactions")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    TRANSACTIONS_FIELD_NUMBER: _ClassVar[int]
    module: str
    item: str
    plan: str
    quantity: str
    unit: str
    unit_price: Money
    amount: Money
    transactions: int
    def __init__(self, module: _Optional[str] = ..., item: _Optional[str] = ..., plan: _Optional[str] = ..., quantity: _Optional[str] = ..., unit: _Optional[str] = ..., unit_price: _Optional[_Union[Money, _Mapping]] = ..., amount: _Optional[_Union[Money, _Mapping]] = ..., transactions: _Optional[int] = ...) -> None: ...

class AccountInvoice(_message.Message):
    __slots__ = ("account", "period", "currency", "lines", "total", "totals")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    account: str
    period: str
    currency: str
    lines: _containers.RepeatedCompositeFieldContainer[InvoiceLine]
    total: Money
    totals: _containers.RepeatedCompositeFieldContainer[Money]
    def __init__(self, account: _Optional[str] = ..., period: _Optional[str] = ..., currency: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[InvoiceLine, _Mapping]]] = ..., total: _Optional[_Union[Money, _Mapping]] = ..., totals: _Optional[_Iterable[_Union[Money, _Mapping]]] = ...) -> None: ...

class PayoutsRequest(_message.Message):
    __slots__ = ("period", "vendor")
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    period: str
    vendor: str
    def __init__(self, period: _Optional[str] = ..., vendor: _Optional[str] = ...) -> None: ...

class PayoutLine(_message.Message):
    __slots__ = ("module", "transactions", "accounts", "gross", "platform_share", "payout")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    TRANSACTIONS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    GROSS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_SHARE_FIELD_NUMBER: _ClassVar[int]
    PAYOUT_FIELD_NUMBER: _ClassVar[int]
    module: str
    transactions: int
    accounts: int
    gross: Money
    platform_share: Money
    payout: Money
    def __init__(self, module: _Optional[str] = ..., transactions: _Optional[int] = ..., accounts: _Optional[int] = ..., gross: _Optional[_Union[Money, _Mapping]] = ..., platform_share: _Optional[_Union[Money, _Mapping]] = ..., payout: _Optional[_Union[Money, _Mapping]] = ...) -> None: ...

class PayoutStatement(_message.Message):
    __slots__ = ("vendor", "period", "currency", "lines", "gross", "platform_share", "total")
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    GROSS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_SHARE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    vendor: str
    period: str
    currency: str
    lines: _containers.RepeatedCompositeFieldContainer[PayoutLine]
    gross: Money
    platform_share: Money
    total: Money
    def __init__(self, vendor: _Optional[str] = ..., period: _Optional[str] = ..., currency: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[PayoutLine, _Mapping]]] = ..., gross: _Optional[_Union[Money, _Mapping]] = ..., platform_share: _Optional[_Union[Money, _Mapping]] = ..., total: _Optional[_Union[Money, _Mapping]] = ...) -> None: ...

class PayoutsReport(_message.Message):
    __slots__ = ("period", "vendor", "statements", "total", "totals")
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    VENDOR_FIELD_NUMBER: _ClassVar[int]
    STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    period: str
    vendor: str
    statements: _containers.RepeatedCompositeFieldContainer[PayoutStatement]
    total: Money
    totals: _containers.RepeatedCompositeFieldContainer[Money]
    def __init__(self, period: _Optional[str] = ..., vendor: _Optional[str] = ..., statements: _Optional[_Iterable[_Union[PayoutStatement, _Mapping]]] = ..., total: _Optional[_Union[Money, _Mapping]] = ..., totals: _Optional[_Iterable[_Union[Money, _Mapping]]] = ...) -> None: ...

class SessionCostRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionCost(_message.Message):
    __slots__ = ("session_id", "account", "cost", "live", "module")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    account: str
    cost: Money
    live: bool
    module: str
    def __init__(self, session_id: _Optional[str] = ..., account: _Optional[str] = ..., cost: _Optional[_Union[Money, _Mapping]] = ..., live: _Optional[bool] = ..., module: _Optional[str] = ...) -> None: ...

class BalanceRequest(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: str
    def __init__(self, account: _Optional[str] = ...) -> None: ...

class AccountBalance(_message.Message):
    __slots__ = ("account", "balance", "funds_left", "out_of_funds", "period", "period_charges", "live_sessions_cost", "banned", "caps_reached")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    FUNDS_LEFT_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_FUNDS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    PERIOD_CHARGES_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_COST_FIELD_NUMBER: _ClassVar[int]
    BANNED_FIELD_NUMBER: _ClassVar[int]
    CAPS_REACHED_FIELD_NUMBER: _ClassVar[int]
    account: str
    balance: Money
    funds_left: Money
    out_of_funds: bool
    period: str
    period_charges: Money
    live_sessions_cost: Money
    banned: bool
    caps_reached: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, account: _Optional[str] = ..., balance: _Optional[_Union[Money, _Mapping]] = ..., funds_left: _Optional[_Union[Money, _Mapping]] = ..., out_of_funds: _Optional[bool] = ..., period: _Optional[str] = ..., period_charges: _Optional[_Union[Money, _Mapping]] = ..., live_sessions_cost: _Optional[_Union[Money, _Mapping]] = ..., banned: _Optional[bool] = ..., caps_reached: _Optional[_Iterable[str]] = ...) -> None: ...

class BillingEventsRequest(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: str
    def __init__(self, account: _Optional[str] = ...) -> None: ...

class BillingEvent(_message.Message):
    __slots__ = ("id", "type", "account", "data", "time_ns")
    ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TIME_NS_FIELD_NUMBER: _ClassVar[int]
    id: str
    type: str
    account: str
    data: _struct_pb2.Struct
    time_ns: int
    def __init__(self, id: _Optional[str] = ..., type: _Optional[str] = ..., account: _Optional[str] = ..., data: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., time_ns: _Optional[int] = ...) -> None: ...
